"""The Mamba-2 chunked scan (SSD): public function `ssd`, alias `mamba_chunk_scan_combined` (`docs/ssd_op.md`).

    S_t[h] = exp(dt_t[h] A_h) S_{t-1}[h] + dt_t[h] x_t[h] B_t[g(h)]^T,   y_t[h] = S_t[h] C_t[g(h)] + D_h x_t[h]

then `y *= silu(z)` when z is given. `ssd` validates, transforms dt (bias, softplus, clamp), turns
`seq_idx` into reset counters, runs the `ssmkit::ssd` custom op (`op.py`: the Triton kernels of
`triton_ssd.py` or the chunked path of `reference.py`) and applies the D skip and the z gate with
plain torch ops, so `torch.compile(fullgraph=True)` traces it.
"""
from __future__ import annotations

import torch

from kernels._triton import choose_backend
from kernels.ssd.op import ssd_op
from kernels.ssd.reference import effective_dt, segment_ids, skip_and_gate, ssd_ref

__all__ = ["ssd", "mamba_chunk_scan_combined", "ssd_ref"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape_error(name, t, expected):
    return ValueError(f"ssd: {name} must have shape {expected}, got {tuple(t.shape)}")


# long: one flat list of argument checks reads better than several small helpers.
def _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit):
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
             "initial_states": initial_states, "seq_idx": seq_idx}
    for name, t in named.items():
        if t is None and name in ("x", "dt", "A", "B", "C"):
            raise TypeError(f"ssd: {name} is required")
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"ssd: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t is not None and name != "seq_idx" and t.dtype not in _DTYPES:
            raise TypeError(f"ssd: {name} must be a floating tensor {_DTYPES}, got {t.dtype}")
    if seq_idx is not None and (seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool):
        raise TypeError(f"ssd: seq_idx must be an integer tensor, got {seq_idx.dtype}")
    if cu_seqlens is not None:
        raise ValueError("ssd: cu_seqlens (per-document final states) is not supported; pack documents "
                         "with seq_idx and take the final state of the last one with return_final_states")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, torch.SymInt)) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be an int >= 1, got {chunk_size!r}")
    if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2 and dt_limit[0] <= dt_limit[1]):
        raise ValueError(f"ssd: dt_limit must be a pair (lo, hi) with lo <= hi, got {dt_limit!r}")
    if x.dim() != 4 or x.shape[1] < 1:
        raise ValueError(f"ssd: x must have shape (batch, seqlen >= 1, nheads, headdim), got {tuple(x.shape)}")
    b, L, H, P = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, L):
        raise _shape_error("B", B, f"({b}, {L}, ngroups, dstate)")
    G, N = B.shape[2:]
    if G < 1 or N < 1 or H % G:
        raise ValueError(f"ssd: B {tuple(B.shape)}: ngroups must divide nheads={H} and dstate must be >= 1")
    expected = {"dt": (b, L, H), "A": (H,), "C": (b, L, G, N), "z": (b, L, H, P), "dt_bias": (H,),
                "initial_states": (b, H, P, N), "seq_idx": (b, L)}
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise _shape_error(name, t, shape)
    if D is not None and tuple(D.shape) not in ((H,), (H, P)):
        raise _shape_error("D", D, f"({H},) or ({H}, {P})")
    devices = {t.device for t in named.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"ssd: all tensors must be on one device, got {sorted(map(str, devices))}")


def ssd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
        cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, *,
        backend="auto"):
    """The Mamba-2 scan. Shapes: x, z (batch, seqlen, nheads, headdim); dt (batch, seqlen, nheads);
    A, dt_bias (nheads,); B, C (batch, seqlen, ngroups, dstate); D (nheads,) or (nheads, headdim);
    initial_states (batch, nheads, headdim, dstate); seq_idx (batch, seqlen) int.

    dt = clamp(softplus(dt + dt_bias)) (softplus only if dt_softplus; the clamp to dt_limit always,
    so a negative dt becomes 0 under the default limit). With seq_idx the state resets wherever the
    label changes (packed documents never interact); initial_states feeds each row's first document.
    chunk_size: tokens per chunk; the result does not depend on it (up to rounding).
    Returns y (batch, seqlen, nheads, headdim) in x's dtype, and with return_final_states also the
    state after the last token (batch, nheads, headdim, dstate), float32 (float64 for float64 x).
    backend: "auto" | "triton" | "torch" (see `kernels/_triton.py`). Differentiable in every
    floating input. cu_seqlens is accepted for signature compatibility and must be None.
    """
    _check(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit)
    which = choose_backend(backend, x, dt, A, B, C, auto_interprets=False)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    step = effective_dt(dt.to(ct), None if dt_bias is None else dt_bias.to(ct), dt_softplus, dt_limit)
    doc = None if seq_idx is None else segment_ids(seq_idx)
    init = None if initial_states is None else initial_states.to(ct).contiguous()
    # A sequence shorter than a chunk would be padded to the whole chunk (work ~ chunk^2): use the
    # smallest power of two that holds it. The result does not depend on the chunk size.
    L = x.shape[1]
    if not isinstance(L, torch.SymInt) and L < chunk_size:
        chunk_size = 1 << max(L - 1, 0).bit_length()
    y, final, _ = ssd_op(x.to(ct).contiguous(), step.contiguous(), A.to(ct).contiguous(), B.to(ct).contiguous(),
                         C.to(ct).contiguous(), init, doc, chunk_size, which)
    y = skip_and_gate(y, x.to(ct), None if D is None else D.to(ct), None if z is None else z.to(ct)).to(x.dtype)
    return (y, final) if return_final_states else y


mamba_chunk_scan_combined = ssd
