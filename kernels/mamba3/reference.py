"""Mamba-3 (SISO) in plain PyTorch: the step, the sequential definition and a chunked path.

The math: docs/mamba3.md. Per head h (head dim P, state N) of a group g(h), with per-token
`dt > 0`, `A <= 0`, trapezoid weight `lam in [0, 1]` and rotation rates `theta` (S pairs):

    phi_t   = (phi_{t-1} + theta_t dt_t) mod 2 pi                    (S,)
    Bt_t    = R(phi_t) (B_t + B_bias),   Ct_t = R(phi_t) (C_t + C_bias)      (N,)
    S_t     = a_t S_{t-1} + (1 - lam_t) dt_t a_t x_{t-1} Bt_{t-1}^T + lam_t dt_t x_t Bt_t^T,
              a_t = exp(dt_t A_t)                                     (P, N)
    y_t     = S_t Ct_t + D x_t,   then y_t * silu(z_t) when z is given

`R(phi)` rotates the interleaved pairs `(2i, 2i+1)`, i < S, by `phi_i`; the other `N - 2S`
dimensions pass through. The activations that produce `dt`, `A`, `lam`, `theta` from the input
projections (softplus, sigmoid, `pi tanh`) belong to the layer; these functions take their results.
The three step coefficients are the exponential-trapezoidal rule (`ssm.discretize.exp_trapezoid_diag`,
written out here because `kernels` does not import `ssm`).

- `mamba3_step`: one token, `Mamba3State` in and out (decoding).
- `mamba3_ref`: the definition, a loop of `mamba3_step`; float64 ground truth (small L only).
- `mamba3_chunked`: the same map without a loop over time steps: chunks of `chunk_size` tokens,
  a masked quadratic form inside each chunk and state passing between chunks (a loop over
  chunks); memory O(b L chunk_size H + b (L / chunk_size) H P N). Differentiable by autograd.

Shapes: x, z (b, L, H, P); dt, A, lam (b, L, H); B, C (b, L, G, N), H a multiple of G;
theta (b, L, H, S) with 2 S <= N; D (H,); B_bias, C_bias (H, N).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

TWO_PI = 2 * math.pi


class Mamba3State(NamedTuple):
    """What a Mamba-3 head carries from one token to the next."""
    angle: torch.Tensor   # (b, H, S) cumulative rotation angle phi, in [0, 2 pi)
    ssm: torch.Tensor     # (b, H, P, N) the state S
    B_prev: torch.Tensor  # (b, H, N) the previous token's rotated, biased B
    x_prev: torch.Tensor  # (b, H, P) the previous token's input


def default_state(b: int, H: int, P: int, N: int, S: int, *, dtype=torch.float32, device=None) -> Mamba3State:
    """The zero state (no previous token: its B and x are zero, so its trapezoid term vanishes)."""
    return Mamba3State(torch.zeros(b, H, S, dtype=dtype, device=device),
                       torch.zeros(b, H, P, N, dtype=dtype, device=device),
                       torch.zeros(b, H, N, dtype=dtype, device=device),
                       torch.zeros(b, H, P, dtype=dtype, device=device))


def rotate_pairs(v: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs `(2i, 2i+1)`, i < S, of v (..., N) by phi (..., S)."""
    r = 2 * phi.shape[-1]
    pairs = v[..., :r].unflatten(-1, (-1, 2))  # (..., S, 2)
    c, s = torch.cos(phi), torch.sin(phi)  # (..., S)
    rot = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s,
                       pairs[..., 0] * s + pairs[..., 1] * c], dim=-1).flatten(-2)  # (..., 2S)
    return torch.cat([rot, v[..., r:]], dim=-1)  # (..., N)


def _heads(t: torch.Tensor, H: int, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., G, N) per group -> (..., H, N) per head, plus the per-head bias."""
    t = t.repeat_interleave(H // t.shape[-2], dim=-2)  # (..., H, N)
    return t if bias is None else t + bias


def _skip_and_gate(y, x, D, z):
    if D is not None:
        y = y + D[:, None] * x
    return y if z is None else y * F.silu(z)


def _check(x, dt, A, B, C, lam, theta, z, state) -> None:
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    for name, t in (("dt", dt), ("A", A), ("lam", lam)):
        if t.shape != (b, L, H):
            raise ValueError(f"{name} must have shape (b, L, H) = {(b, L, H)}, got {tuple(t.shape)}")
    if B.shape != (b, L, G, N) or C.shape != (b, L, G, N) or H % G:
        raise ValueError(f"B and C must have shape (b, L, G, N) with H={H} a multiple of G, got "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}")
    if theta.dim() != 4 or theta.shape[:3] != (b, L, H) or 2 * theta.shape[-1] > N:
        raise ValueError(f"theta must have shape (b, L, H, S) = {(b, L, H)} + (S,) with 2 S <= N={N}, "
                         f"got {tuple(theta.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    want = ((b, H, theta.shape[-1]), (b, H, P, N), (b, H, N), (b, H, P))
    if state is not None and tuple(tuple(s.shape) for s in state) != want:
        raise ValueError(f"state must be Mamba3State with shapes {want}, got "
                         f"{tuple(tuple(s.shape) for s in state)}")


def mamba3_step(x, dt, A, B, C, lam, theta, state: Mamba3State, D=None, z=None, B_bias=None,
                C_bias=None):
    """One token: x, z (b, H, P); dt, A, lam (b, H); B, C (b, G, N); theta (b, H, S).

    Returns `(y (b, H, P), next state)`.
    """
    H = x.shape[1]
    phi = torch.remainder(state.angle + theta * dt[..., None], TWO_PI)  # (b, H, S)
    Bt = rotate_pairs(_heads(B, H, B_bias), phi)  # (b, H, N)
    Ct = rotate_pairs(_heads(C, H, C_bias), phi)  # (b, H, N)
    alpha = torch.exp(dt * A)  # (b, H)
    beta = (1 - lam) * dt * alpha  # (b, H) weight of the previous token's term
    gamma = lam * dt  # (b, H) weight of this token's term
    S = (alpha[..., None, None] * state.ssm
         + beta[..., None, None] * state.x_prev[..., None] * state.B_prev[..., None, :]
         + gamma[..., None, None] * x[..., None] * Bt[..., None, :])  # (b, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", S, Ct)  # (b, H, P)
    return _skip_and_gate(y, x, D, z), Mamba3State(phi, S, Bt, x)


def mamba3_ref(x, dt, A, B, C, lam, theta, D=None, z=None, B_bias=None, C_bias=None,
               initial_state: Mamba3State | None = None):
    """The definition: `mamba3_step` over t = 0..L-1. Returns `(y (b, L, H, P), final state)`."""
    _check(x, dt, A, B, C, lam, theta, z, initial_state)
    b, L, H, P = x.shape
    state = initial_state or default_state(b, H, P, B.shape[-1], theta.shape[-1], dtype=x.dtype,
                                           device=x.device)
    ys = []
    for t in range(L):
        y, state = mamba3_step(x[:, t], dt[:, t], A[:, t], B[:, t], C[:, t], lam[:, t], theta[:, t],
                               state, D, None if z is None else z[:, t], B_bias, C_bias)
        ys.append(y)
    return torch.stack(ys, dim=1), state  # (b, L, H, P)


def _chunks(t: torch.Tensor, Q: int) -> torch.Tensor:
    """(b, L, ...) -> (b, L/Q, Q, ...), zero-padded at the end (a zero log-decay and a zero input
    leave the state unchanged)."""
    pad = (-t.shape[1]) % Q
    if pad:
        t = torch.cat([t, t.new_zeros((t.shape[0], pad) + t.shape[2:])], dim=1)
    return t.unflatten(1, (-1, Q))


def chunked_scan(u, logdecay, Bt, Ct, S0, chunk_size: int):
    """`S_t = exp(logdecay_t) S_{t-1} + u_t Bt_t^T`, `y_t = S_t Ct_t` by chunks.

    u (b, L, H, P), logdecay (b, L, H), Bt, Ct (b, L, H, N), S0 (b, H, P, N) ->
    (y (b, L, H, P), S_L (b, H, P, N)). Inside a chunk `y = (Lmask o Ct Bt^T) u` with
    `Lmask[i, j] = exp(sum_{j<r<=i} logdecay_r)`, plus the incoming state's term.
    """
    L = u.shape[1]
    u, Bt, Ct = _chunks(u, chunk_size), _chunks(Bt, chunk_size), _chunks(Ct, chunk_size)
    acum = torch.cumsum(_chunks(logdecay, chunk_size), dim=2)  # (b, c, Q, H)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=u.device).tril()
    diff = acum[:, :, :, None] - acum[:, :, None, :]  # (b, c, Q_i, Q_j, H)
    Lmask = torch.exp(torch.where(causal[:, :, None], diff, -math.inf))  # (b, c, Q, Q, H)
    scores = torch.einsum("bcihn,bcjhn->bcijh", Ct, Bt) * Lmask  # (b, c, Q, Q, H)
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, u)  # (b, c, Q, H, P)
    to_end = torch.exp(acum[:, :, -1:] - acum)  # (b, c, Q, H)
    s_chunk = torch.einsum("bcjh,bcjhp,bcjhn->bchpn", to_end, u, Bt)  # (b, c, H, P, N)
    decay_chunk = torch.exp(acum[:, :, -1])  # (b, c, H)
    S, incoming = S0, []
    for c in range(u.shape[1]):
        incoming.append(S)
        S = decay_chunk[:, c, :, None, None] * S + s_chunk[:, c]  # (b, H, P, N)
    S_in = torch.stack(incoming, dim=1)  # (b, c, H, P, N)
    y = y + torch.einsum("bcihn,bchpn->bcihp", Ct * torch.exp(acum)[..., None], S_in)
    return y.flatten(1, 2)[:, :L], S  # (b, L, H, P), (b, H, P, N)


def mamba3_chunked(x, dt, A, B, C, lam, theta, D=None, z=None, B_bias=None, C_bias=None,
                   initial_state: Mamba3State | None = None, chunk_size: int = 64):
    """`mamba3_ref` without a loop over time (docs/mamba3.md, "Chunked form").

    Token s enters the state with weight `w_s = lam_s dt_s + (1 - lam_{s+1}) dt_{s+1}` (its own
    step's new-end weight plus the next step's old-end weight, `dt_L = 0`), which makes the scan a
    plain diagonal one; at s = t only `lam_t dt_t` has entered yet, so the term
    `(1 - lam_{t+1}) dt_{t+1} (Ct_t . Bt_t) x_t` is taken off again. The previous token of the
    initial state enters as `(1 - lam_0) dt_0 x_prev Bt_prev^T`.
    """
    _check(x, dt, A, B, C, lam, theta, z, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, _, H, P = x.shape
    st = initial_state or default_state(b, H, P, B.shape[-1], theta.shape[-1], dtype=x.dtype,
                                        device=x.device)
    phi = torch.remainder(st.angle[:, None] + torch.cumsum(theta * dt[..., None], dim=1), TWO_PI)  # (b, L, H, S)
    Bt = rotate_pairs(_heads(B, H, B_bias), phi)  # (b, L, H, N)
    Ct = rotate_pairs(_heads(C, H, C_bias), phi)  # (b, L, H, N)
    old_end = (1 - lam) * dt  # (b, L, H) weight of token t-1 in step t
    next_old_end = torch.cat([old_end[:, 1:], old_end.new_zeros(b, 1, H)], dim=1)  # (b, L, H)
    w = lam * dt + next_old_end  # (b, L, H)
    S0 = st.ssm + old_end[:, 0, :, None, None] * st.x_prev[..., None] * st.B_prev[..., None, :]  # (b, H, P, N)
    y, S = chunked_scan(w[..., None] * x, dt * A, Bt, Ct, S0, chunk_size)  # (b, L, H, P)
    y = y - (next_old_end * (Ct * Bt).sum(-1))[..., None] * x  # (b, L, H, P)
    return _skip_and_gate(y, x, D, z), Mamba3State(phi[:, -1], S, Bt[:, -1], x[:, -1])
