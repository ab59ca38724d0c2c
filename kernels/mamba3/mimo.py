"""Mamba-3 MIMO (rank r) in plain PyTorch: the step, the sequential definition and a chunked path.

The math: docs/mamba3.md, "MIMO". Per head h of group g(h), with the scalars `dt, A, lam` and
the rotation `phi` of the SISO case (`reference.py`), the input x_t (P,) is lifted to r copies
`v_{t,k} = mimo_x[h, k] o x_t` and B, C come in r copies each:

    Bt_{t,k} = R(phi_t) (B_{t,k} + B_bias[h, k]),   Ct_{t,k} = R(phi_t) (C_{t,k} + C_bias[h, k])
    S_t      = a_t S_{t-1} + (1 - lam_t) dt_t a_t sum_k v_{t-1,k} Bt_{t-1,k}^T
                           + lam_t dt_t sum_k v_{t,k} Bt_{t,k}^T                    (P, N)
    y_{t,k}  = S_t Ct_{t,k} + D v_{t,k},   times silu(mimo_z[h, k] o z_t) when z is given
    y_t      = sum_k mimo_o[h, k] o y_{t,k}         (without mimo_o: the r outputs y_{t,k})

The state keeps the rotated `Bt_{t-1}` (r copies) and the un-lifted x_{t-1}. The rotation pairs
are `(i, N/2 + i)` by default (`half=True`), as the public MIMO kernels lay them out.

Shapes: x, z (b, L, H, P); dt, A, lam (b, L, H); B, C (b, L, r, G, N); theta (b, L, H, S);
mimo_x, mimo_z, mimo_o (H, r, P); B_bias, C_bias (H, r, N); D (H,).
State: `Mamba3State(angle (b, H, S), ssm (b, H, P, N), B_prev (b, H, r, N), x_prev (b, H, P))`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.mamba3.reference import (
                                      TWO_PI,
                                      Mamba3State,
                                      chunked_scan,
                                      cumulative_angle,
                                      doc_resets,
                                      reset_state,
                                      rotate_pairs,
)


def default_state_mimo(b: int, H: int, P: int, N: int, S: int, r: int, *, dtype=torch.float32,
                       device=None) -> Mamba3State:
    """The zero state of a rank-r head (no previous token)."""
    return Mamba3State(torch.zeros(b, H, S, dtype=dtype, device=device),
                       torch.zeros(b, H, P, N, dtype=dtype, device=device),
                       torch.zeros(b, H, r, N, dtype=dtype, device=device),
                       torch.zeros(b, H, P, dtype=dtype, device=device))


def _heads(t: torch.Tensor, H: int, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., r, G, N) per group -> (..., H, r, N) per head, plus the per-head bias (H, r, N)."""
    t = t.repeat_interleave(H // t.shape[-2], dim=-2).transpose(-3, -2)  # (..., H, r, N)
    return t if bias is None else t + bias


def _outputs(y, v, D, z, mimo_z, mimo_o):
    """y, v (..., H, r, P): skip, per-copy gate, down projection (when mimo_o is given)."""
    if D is not None:
        y = y + D[:, None, None] * v
    if z is not None:
        y = y * F.silu(mimo_z * z[..., None, :])  # (..., H, r, P)
    return y if mimo_o is None else (y * mimo_o).sum(-2)  # (..., H, P) or (..., H, r, P)


def check_mimo(x, dt, A, B, C, lam, theta, mimo_x, mimo_z, mimo_o, z, B_bias, C_bias, state, half) -> None:
    b, L, H, P = x.shape
    for name, t in (("dt", dt), ("A", A), ("lam", lam)):
        if t.shape != (b, L, H):
            raise ValueError(f"{name} must have shape (b, L, H) = {(b, L, H)}, got {tuple(t.shape)}")
    if B.dim() != 5 or B.shape[:2] != (b, L) or C.shape != B.shape or H % B.shape[3]:
        raise ValueError(f"B and C must have shape (b, L, r, G, N) = {(b, L)} + (r, G, N) with H={H} a "
                         f"multiple of G, got B {tuple(B.shape)}, C {tuple(C.shape)}")
    r, _, N = B.shape[2:]
    S = theta.shape[-1]
    if theta.dim() != 4 or theta.shape[:3] != (b, L, H) or 2 * S > N or (half and N % 2):
        raise ValueError(f"theta must have shape (b, L, H, S) = {(b, L, H)} + (S,) with 2 S <= N={N} "
                         f"(and N even for half-split pairs), got {tuple(theta.shape)}")
    for name, t in (("mimo_x", mimo_x), ("mimo_z", mimo_z), ("mimo_o", mimo_o)):
        if t is not None and t.shape != (H, r, P):
            raise ValueError(f"{name} must have shape (H, r, P) = {(H, r, P)}, got {tuple(t.shape)}")
    for name, t in (("B_bias", B_bias), ("C_bias", C_bias)):
        if t is not None and t.shape != (H, r, N):
            raise ValueError(f"{name} must have shape (H, r, N) = {(H, r, N)}, got {tuple(t.shape)}")
    if z is not None and (z.shape != x.shape or mimo_z is None):
        raise ValueError(f"z must have the shape of x {tuple(x.shape)} and comes with mimo_z, got "
                         f"z {tuple(z.shape)}, mimo_z {None if mimo_z is None else tuple(mimo_z.shape)}")
    want = ((b, H, S), (b, H, P, N), (b, H, r, N), (b, H, P))
    if state is not None and tuple(tuple(s.shape) for s in state) != want:
        raise ValueError(f"state must be Mamba3State with shapes {want}, got "
                         f"{tuple(tuple(s.shape) for s in state)}")


def mamba3_mimo_step(x, dt, A, B, C, lam, theta, state: Mamba3State, mimo_x, mimo_z=None, mimo_o=None,
                     D=None, z=None, B_bias=None, C_bias=None, *, half: bool = True):
    """One token: x, z (b, H, P); dt, A, lam (b, H); B, C (b, r, G, N); theta (b, H, S).

    Returns `(y (b, H, P) or (b, H, r, P) without mimo_o, next state)`.
    """
    H = x.shape[1]
    phi = torch.remainder(state.angle + theta * dt[..., None], TWO_PI)  # (b, H, S)
    Bt = rotate_pairs(_heads(B, H, B_bias), phi[:, :, None], half=half)  # (b, H, r, N)
    Ct = rotate_pairs(_heads(C, H, C_bias), phi[:, :, None], half=half)  # (b, H, r, N)
    v = mimo_x * x[:, :, None]  # (b, H, r, P)
    v_prev = mimo_x * state.x_prev[:, :, None]  # (b, H, r, P)
    alpha = torch.exp(dt * A)[..., None, None]  # (b, H, 1, 1)
    beta = (1 - lam) * dt * torch.exp(dt * A)  # (b, H)
    gamma = lam * dt  # (b, H)
    S = (alpha * state.ssm
         + beta[..., None, None] * torch.einsum("bhrp,bhrn->bhpn", v_prev, state.B_prev)
         + gamma[..., None, None] * torch.einsum("bhrp,bhrn->bhpn", v, Bt))  # (b, H, P, N)
    y = torch.einsum("bhpn,bhrn->bhrp", S, Ct)  # (b, H, r, P)
    return _outputs(y, v, D, z, mimo_z, mimo_o), Mamba3State(phi, S, Bt, x)


def mamba3_mimo_ref(x, dt, A, B, C, lam, theta, mimo_x, mimo_z=None, mimo_o=None, D=None, z=None,
                    B_bias=None, C_bias=None, initial_state: Mamba3State | None = None, seq_idx=None, *,
                    half: bool = True):
    """The definition: `mamba3_mimo_step` over t = 0..L-1 (restarting where seq_idx changes).
    Returns `(y, final state)`."""
    check_mimo(x, dt, A, B, C, lam, theta, mimo_x, mimo_z, mimo_o, z, B_bias, C_bias, initial_state, half)
    b, L, H, P = x.shape
    r, N = B.shape[2], B.shape[-1]
    reset = doc_resets(seq_idx, b, L)
    state = initial_state or default_state_mimo(b, H, P, N, theta.shape[-1], r, dtype=x.dtype, device=x.device)
    ys = []
    for t in range(L):
        if reset is not None:
            state = reset_state(state, reset[:, t])
        y, state = mamba3_mimo_step(x[:, t], dt[:, t], A[:, t], B[:, t], C[:, t], lam[:, t], theta[:, t], state,
                                    mimo_x, mimo_z, mimo_o, D, None if z is None else z[:, t], B_bias, C_bias,
                                    half=half)
        ys.append(y)
    return torch.stack(ys, dim=1), state  # (b, L, H, P) or (b, L, H, r, P)


def mamba3_mimo_chunked(x, dt, A, B, C, lam, theta, mimo_x, mimo_z=None, mimo_o=None, D=None, z=None,
                        B_bias=None, C_bias=None, initial_state: Mamba3State | None = None,
                        chunk_size: int = 64, seq_idx=None, *, half: bool = True, core=chunked_scan):
    """`mamba3_mimo_ref` without a loop over time: the SISO chunked form (`mamba3_chunked`) with a
    rank-r update, `core` (`chunked_scan` or the custom op, as in `mamba3_chunked`) summing the r
    copies of each token."""
    check_mimo(x, dt, A, B, C, lam, theta, mimo_x, mimo_z, mimo_o, z, B_bias, C_bias, initial_state, half)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, _, H, P = x.shape
    r, N = B.shape[2], B.shape[-1]
    st = initial_state or default_state_mimo(b, H, P, N, theta.shape[-1], r, dtype=x.dtype, device=x.device)
    reset = doc_resets(seq_idx, b, x.shape[1])
    phi = cumulative_angle(st.angle, theta, dt, reset)  # (b, L, H, S)
    Bt = rotate_pairs(_heads(B, H, B_bias), phi[..., None, :], half=half)  # (b, L, H, r, N)
    Ct = rotate_pairs(_heads(C, H, C_bias), phi[..., None, :], half=half)  # (b, L, H, r, N)
    v = mimo_x * x[..., None, :]  # (b, L, H, r, P)
    old_end = (1 - lam) * dt  # (b, L, H)
    if reset is not None:
        old_end = torch.where(reset[..., None], 0.0, old_end)
    next_old_end = torch.cat([old_end[:, 1:], old_end.new_zeros(b, 1, H)], dim=1)  # (b, L, H)
    w = lam * dt + next_old_end  # (b, L, H)
    prev = torch.einsum("bhrp,bhrn->bhpn", mimo_x * st.x_prev[:, :, None], st.B_prev)  # (b, H, P, N)
    S0 = st.ssm + old_end[:, 0, :, None, None] * prev  # (b, H, P, N)
    y, S = core(w[..., None, None] * v, dt * A, Bt, Ct, S0, chunk_size, seq_idx)  # (b, L, H, r, P)
    pending = torch.einsum("blhkn,blhmn,blhmp->blhkp", Ct, Bt, v)  # (b, L, H, r, P)
    y = y - next_old_end[..., None, None] * pending
    return _outputs(y, v, D, z, mimo_z, mimo_o), Mamba3State(phi[:, -1], S, Bt[:, -1], x[:, -1])
