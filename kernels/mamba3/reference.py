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
  `chunked_scan` is its core and also serves the rank-r (MIMO) update of `mimo.py`.
- Packed documents: `seq_idx` (b, L) restarts state, angle and previous-token term wherever it
  changes (`doc_resets`, `cumulative_angle`, the masks of `chunked_scan`).

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


def rotate_pairs(v: torch.Tensor, phi: torch.Tensor, *, half: bool = False) -> torch.Tensor:
    """Rotate S pairs of v (..., N) by phi (..., S): the interleaved pairs `(2i, 2i+1)`, i < S, or
    with `half=True` the pairs `(i, N/2 + i)`, i < S (N even; the layout of the public MIMO kernels)."""
    S = phi.shape[-1]
    c, s = torch.cos(phi), torch.sin(phi)  # (..., S)
    if half:
        h = v.shape[-1] // 2
        a, b = v[..., :S], v[..., h:h + S]  # (..., S) each
        return torch.cat([a * c - b * s, v[..., S:h], a * s + b * c, v[..., h + S:]], dim=-1)  # (..., N)
    pairs = v[..., :2 * S].unflatten(-1, (-1, 2))  # (..., S, 2)
    rot = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s,
                       pairs[..., 0] * s + pairs[..., 1] * c], dim=-1).flatten(-2)  # (..., 2S)
    return torch.cat([rot, v[..., 2 * S:]], dim=-1)  # (..., N)


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


def doc_resets(seq_idx: torch.Tensor | None, b: int, L: int) -> torch.Tensor | None:
    """seq_idx (b, L) document labels -> (b, L) bool, True where a new document starts (t > 0)."""
    if seq_idx is None:
        return None
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.shape != (b, L) or seq_idx.is_floating_point():
        raise ValueError(f"seq_idx must be an integer tensor of shape (b, L) = {(b, L)}, got "
                         f"{tuple(seq_idx.shape) if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__}")
    return F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))


def reset_state(state: Mamba3State, reset_t: torch.Tensor) -> Mamba3State:
    """Zero the rows of `state` where reset_t (b,) is True: a new document starts with no history."""
    return Mamba3State(*(torch.where(reset_t.view(-1, *([1] * (s.dim() - 1))), 0.0, s) for s in state))


def cumulative_angle(angle0, theta, dt, reset):
    """phi_t = (angle0 + sum_{r<=t} theta_r dt_r) mod 2 pi, (b, L, H, S); with `reset` (b, L)
    every document after the first starts from 0. Summed in float64: a float32 running sum of
    L angles would lose ~L * eps radians before the reduction."""
    wide = torch.float32 if theta.device.type == "mps" else torch.float64  # MPS has no float64
    inc = (theta * dt[..., None]).to(wide)  # (b, L, H, S)
    cum = torch.cumsum(inc, dim=1)  # (b, L, H, S)
    if reset is None:
        phi = angle0[:, None].to(wide) + cum
    else:
        ar = torch.arange(inc.shape[1], device=inc.device)
        start = torch.cummax(torch.where(reset, ar, 0), dim=1).values  # (b, L): the latest document start
        before = (cum - inc).gather(1, start[..., None, None].expand_as(cum))  # sum up to the start, exclusive
        phi = cum - before + torch.where((start == 0)[..., None, None], angle0[:, None].to(wide), 0.0)
    return torch.remainder(phi, TWO_PI).to(theta.dtype)


def mamba3_ref(x, dt, A, B, C, lam, theta, D=None, z=None, B_bias=None, C_bias=None,
               initial_state: Mamba3State | None = None, seq_idx=None):
    """The definition: `mamba3_step` over t = 0..L-1. Returns `(y (b, L, H, P), final state)`.

    seq_idx (b, L): where it changes, the state restarts from `default_state` (packed documents).
    """
    _check(x, dt, A, B, C, lam, theta, z, initial_state)
    b, L, H, P = x.shape
    reset = doc_resets(seq_idx, b, L)
    state = initial_state or default_state(b, H, P, B.shape[-1], theta.shape[-1], dtype=x.dtype,
                                           device=x.device)
    ys = []
    for t in range(L):
        if reset is not None:
            state = reset_state(state, reset[:, t])
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


def _doc_masks(doc, Q: int):
    """Chunks of `doc` (b, L) -> bool masks: the incoming state reaches the token (b, c, Q), tokens
    i, j share a document (b, c, Q, Q), the token reaches the chunk's end (b, c, Q), the state
    carries through the whole chunk (b, c)."""
    pad = (-doc.shape[1]) % Q
    d = torch.cat([doc, doc[:, -1:].expand(-1, pad)], dim=1).unflatten(1, (-1, Q))  # (b, c, Q)
    d_in = torch.cat([d[:, :1, :1], d[:, :-1, -1:]], dim=1)  # (b, c, 1): the token before each chunk
    return d == d_in, d[:, :, :, None] == d[:, :, None, :], d == d[:, :, -1:], d[:, :, -1] == d_in[..., 0]


def chunked_scan(u, logdecay, Bt, Ct, S0, chunk_size: int, doc=None):
    """`S_t = exp(logdecay_t) S_{t-1} + u_t Bt_t^T`, `y_t = S_t Ct_t` by chunks.

    u (b, L, H, P), logdecay (b, L, H), Bt, Ct (b, L, H, N), S0 (b, H, P, N) ->
    (y (b, L, H, P), S_L (b, H, P, N)). Inside a chunk `y = (Lmask o Ct Bt^T) u` with
    `Lmask[i, j] = exp(sum_{j<r<=i} logdecay_r)`, plus the incoming state's term.
    Rank r (MIMO): u (b, L, H, r, P), Bt, Ct (b, L, H, r, N), `u_t Bt_t^T` summed over the r
    copies and one output per copy of Ct: y (b, L, H, r, P).
    doc (b, L) int, non-decreasing: the state restarts from zero wherever it changes (S0 feeds the
    first document); masks replace the decays across a boundary by 0.
    """
    if u.dim() == 4:
        y, S = chunked_scan(u[..., None, :], logdecay, Bt[..., None, :], Ct[..., None, :], S0, chunk_size, doc)
        return y[..., 0, :], S
    L = u.shape[1]
    u, Bt, Ct = _chunks(u, chunk_size), _chunks(Bt, chunk_size), _chunks(Ct, chunk_size)
    acum = torch.cumsum(_chunks(logdecay, chunk_size), dim=2)  # (b, c, Q, H)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=u.device).tril()
    diff = acum[:, :, :, None] - acum[:, :, None, :]  # (b, c, Q_i, Q_j, H)
    masks = None if doc is None else _doc_masks(doc, chunk_size)
    keep = causal if masks is None else causal & masks[1]  # (Q, Q) or (b, c, Q, Q)
    Lmask = torch.exp(torch.where(keep[..., None], diff, -math.inf))  # (b, c, Q, Q, H)
    scores = torch.einsum("bcihkn,bcjhmn->bcijhkm", Ct, Bt) * Lmask[..., None, None]  # (b, c, Q, Q, H, r, r)
    y = torch.einsum("bcijhkm,bcjhmp->bcihkp", scores, u)  # (b, c, Q, H, r, P)
    to_end = torch.exp(acum[:, :, -1:] - acum)  # (b, c, Q, H)
    decay_chunk = torch.exp(acum[:, :, -1])  # (b, c, H)
    from_start = torch.exp(acum)  # (b, c, Q, H)
    if masks is not None:
        from_start = from_start * masks[0][..., None]
        to_end, decay_chunk = to_end * masks[2][..., None], decay_chunk * masks[3][..., None]
    s_chunk = torch.einsum("bcjh,bcjhmp,bcjhmn->bchpn", to_end, u, Bt)  # (b, c, H, P, N)
    S, incoming = S0, []
    for c in range(u.shape[1]):
        incoming.append(S)
        S = decay_chunk[:, c, :, None, None] * S + s_chunk[:, c]  # (b, H, P, N)
    S_in = torch.stack(incoming, dim=1)  # (b, c, H, P, N)
    y = y + torch.einsum("bcihkn,bchpn->bcihkp", Ct * from_start[..., None, None], S_in)
    return y.flatten(1, 2)[:, :L], S  # (b, L, H, r, P), (b, H, P, N)


def mamba3_chunked(x, dt, A, B, C, lam, theta, D=None, z=None, B_bias=None, C_bias=None,
                   initial_state: Mamba3State | None = None, chunk_size: int = 64, seq_idx=None, *,
                   core=chunked_scan):
    """`mamba3_ref` without a loop over time (docs/mamba3.md, "Chunked form").

    Token s enters the state with weight `w_s = lam_s dt_s + (1 - lam_{s+1}) dt_{s+1}` (its own
    step's new-end weight plus the next step's old-end weight, `dt_L = 0`), which makes the scan a
    plain diagonal one; at s = t only `lam_t dt_t` has entered yet, so the term
    `(1 - lam_{t+1}) dt_{t+1} (Ct_t . Bt_t) x_t` is taken off again. The previous token of the
    initial state enters as `(1 - lam_0) dt_0 x_prev Bt_prev^T`. With `seq_idx` the first token
    of each later document has no previous token (its old-end weight is 0), its angle restarts
    and `chunked_scan` cuts the decays at the boundary.
    `core`: the function that runs the scan core, `chunked_scan` (autograd through plain torch ops)
    or one with its signature (`mamba3_scan` passes the custom op, `op.scan_core`).
    """
    _check(x, dt, A, B, C, lam, theta, z, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, _, H, P = x.shape
    st = initial_state or default_state(b, H, P, B.shape[-1], theta.shape[-1], dtype=x.dtype,
                                        device=x.device)
    reset = doc_resets(seq_idx, b, x.shape[1])
    phi = cumulative_angle(st.angle, theta, dt, reset)  # (b, L, H, S)
    Bt = rotate_pairs(_heads(B, H, B_bias), phi)  # (b, L, H, N)
    Ct = rotate_pairs(_heads(C, H, C_bias), phi)  # (b, L, H, N)
    old_end = (1 - lam) * dt  # (b, L, H) weight of token t-1 in step t
    if reset is not None:
        old_end = torch.where(reset[..., None], 0.0, old_end)
    next_old_end = torch.cat([old_end[:, 1:], old_end.new_zeros(b, 1, H)], dim=1)  # (b, L, H)
    w = lam * dt + next_old_end  # (b, L, H)
    S0 = st.ssm + old_end[:, 0, :, None, None] * st.x_prev[..., None] * st.B_prev[..., None, :]  # (b, H, P, N)
    y, S = core(w[..., None] * x, dt * A, Bt, Ct, S0, chunk_size, seq_idx)  # (b, L, H, P)
    y = y - (next_old_end * (Ct * Bt).sum(-1))[..., None] * x  # (b, L, H, P)
    return _skip_and_gate(y, x, D, z), Mamba3State(phi[:, -1], S, Bt[:, -1], x[:, -1])
