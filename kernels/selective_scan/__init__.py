"""The selective scan of Mamba: public functions `selective_scan` and `selective_state_update`.

Per token t, channel d and state n (see `reference.py` for the chunked form):

    dt_t[d]   = softplus(delta_t[d] + delta_bias[d])           (when delta_softplus)
    x_t[d, n] = exp(dt_t[d] A[d, n]) x_{t-1}[d, n] + dt_t[d] B_t[n] u_t[d]
    y_t[d]    = sum_n C_t[n] x_t[d, n] + D[d] u_t[d],          y_t *= silu(z_t[d]) when z is given

`selective_scan` takes the arguments of the public Mamba reference's `selective_scan_fn` (real
tensors only), plus `initial_state`, `seq_idx` (packed documents: the state restarts from zero
wherever the label changes) and `backend`; `selective_scan_fn` is the same function under
that name, so Mamba code ports by changing its import. It validates, resolves the backend and calls
the `ssmkit::selective_scan` custom op (`op.py`), so `torch.compile(fullgraph=True)` traces it.
`selective_state_update` (`state_update.py`) advances a decoding state by one token.
"""
from __future__ import annotations

import torch

from kernels._triton import choose_backend

from kernels.selective_scan.op import selective_scan_op
from kernels.selective_scan.reference import compute_dtype, resets_from_seq_idx, selective_scan_ref
from kernels.selective_scan.state_update import selective_state_update

__all__ = ["selective_scan", "selective_scan_fn", "selective_scan_ref", "selective_state_update"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name, t, shape, optional=True):
    if t is None:
        if optional:
            return
        raise TypeError(f"selective_scan: {name} is required")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"selective_scan: {name} is complex ({t.dtype}); only real tensors are supported")
    if t.dtype not in _DTYPES:
        raise TypeError(f"selective_scan: {name} must be a floating tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"selective_scan: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_bc(name, M, batch, dim, N, L):
    _check_tensor(name, M, None, optional=False)
    ok = (M.dim() == 2 and tuple(M.shape) == (dim, N)) or (M.dim() == 3 and tuple(M.shape) == (batch, N, L)) \
        or (M.dim() == 4 and M.shape[0] == batch and M.shape[2:] == (N, L) and M.shape[1] >= 1
            and dim % M.shape[1] == 0)
    if not ok:
        raise ValueError(f"selective_scan: {name} must be (D, N) = {(dim, N)}, (batch, N, L) = {(batch, N, L)} or "
                         f"(batch, G, N, L) with G dividing D = {dim}, got {tuple(M.shape)}")


def _check_seq_idx(seq_idx, batch, L, device):
    if seq_idx is None:
        return
    if not isinstance(seq_idx, torch.Tensor):
        raise TypeError(f"selective_scan: seq_idx must be a torch.Tensor, got {type(seq_idx).__name__}")
    if seq_idx.dtype.is_floating_point or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
        raise TypeError(f"selective_scan: seq_idx must be an integer tensor, got {seq_idx.dtype}")
    if tuple(seq_idx.shape) != (batch, L):
        raise ValueError(f"selective_scan: seq_idx must have shape {(batch, L)} (batch, L), got {tuple(seq_idx.shape)}")
    if seq_idx.device != device:
        raise ValueError(f"selective_scan: seq_idx must be on {device}, got {seq_idx.device}")


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state):
    _check_tensor("u", u, None, optional=False)
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, D, L), got {tuple(u.shape)}")
    batch, dim, L = u.shape
    _check_tensor("A", A, None, optional=False)
    if A.dim() != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f"selective_scan: A must be (D, N) with D = {dim}, got {tuple(A.shape)}")
    N = A.shape[1]
    _check_tensor("delta", delta, u.shape, optional=False)
    _check_bc("B", B, batch, dim, N, L)
    _check_bc("C", C, batch, dim, N, L)
    if B.dim() == 2 and C.dim() != 2 or B.dim() != 2 and C.dim() == 2:
        raise ValueError(f"selective_scan: B and C must both be time-invariant (D, N) or both per token, got B "
                         f"{tuple(B.shape)} and C {tuple(C.shape)}")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"selective_scan: B and C must have the same groups G, got B {tuple(B.shape)} and C "
                         f"{tuple(C.shape)}")
    for name, t, shape in (("D", D, (dim,)), ("z", z, u.shape), ("delta_bias", delta_bias, (dim,)),
                           ("initial_state", initial_state, (batch, dim, N))):
        _check_tensor(name, t, shape)
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"selective_scan: all tensors must be on one device, got {sorted(map(str, devices))}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, backend="auto", seq_idx=None):
    """y (batch, D, L) [, last_state (batch, D, N)] of the selective scan.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (D, N) time-invariant, (batch, N, L) or
    (batch, G, N, L) with G groups dividing D (channel d uses group d // (D / G)); D, delta_bias:
    (D,); initial_state: (batch, D, N), zeros when None. Real tensors; computed in float32 (float64
    when any of u, delta, A, B, C is float64); y comes back in u's dtype, the last state in the
    compute dtype. backend: "auto" | "triton" | "torch" (the chunked PyTorch path); "auto" runs
    Triton on CUDA tensors and the chunked path on CPU tensors, also under the Triton interpreter. Differentiable
    w.r.t. every tensor argument. seq_idx (batch, L) int: packed documents; the state restarts
    from zero before every token whose label differs from the previous one, initial_state feeds
    each row's first document and the last state is the last document's.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    _check_seq_idx(seq_idx, u.shape[0], u.shape[2], u.device)
    which = choose_backend(backend, *(t for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
                                      if t is not None), auto_interprets=False)
    batch, dim, _ = u.shape
    N = A.shape[1]
    f = compute_dtype(u, delta, A, B, C)
    B = B[:, None] if B.dim() == 3 else B                           # (D, N) or (batch, G, N, L)
    C = C[:, None] if C.dim() == 3 else C
    D = u.new_zeros(dim, dtype=f) if D is None else D                # (D,)
    delta_bias = u.new_zeros(dim, dtype=f) if delta_bias is None else delta_bias  # (D,)
    x0 = u.new_zeros(batch, dim, N, dtype=f) if initial_state is None else initial_state  # (batch, D, N)
    reset = None if seq_idx is None else resets_from_seq_idx(seq_idx)   # (batch, L) bool
    y, last, _ = selective_scan_op(u, delta, A, B, C, D, z, delta_bias, x0, bool(delta_softplus), which, reset)
    return (y, last) if return_last_state else y


selective_scan_fn = selective_scan
