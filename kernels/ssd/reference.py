"""The Mamba-2 scan (SSD) in plain PyTorch: the sequential definition and its shared pieces.

The math: `docs/ssd_op.md`. Per head h (head dim P, state N, scalar A_h < 0) of a group g(h):

    S_t[h] = exp(dt_t[h] A_h) S_{t-1}[h] + dt_t[h] x_t[h] B_t[g]^T        (P, N)
    y_t[h] = S_t[h] C_t[g] + D_h x_t[h],   then y_t *= silu(z_t) when z is given

- `effective_dt`: dt_raw -> dt (bias, softplus, clamp to dt_limit).
- `segment_ids`: packed documents -> a counter that grows by one where `seq_idx` changes.
- `skip_and_gate`: the D skip and the z gate, applied after the scan.
- `ssd_ref`: the readable loop over time steps; run it in float64 as ground truth (small L only).

The chunked path (`backend="torch"`) is in `chunked.py`.

No Triton here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def effective_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                 dt_limit: tuple[float, float]) -> torch.Tensor:
    """dt (b, L, H) -> clamp(softplus(dt + dt_bias)) with the clamp always applied, as the public
    Mamba-2 operator does: with the default limit (0, inf) a negative dt becomes 0."""
    if dt_bias is not None:
        dt = dt + dt_bias                                          # (b, L, H)
    if dt_softplus:
        dt = F.softplus(dt)                                        # (b, L, H)
    lo, hi = dt_limit
    return dt.clamp(min=lo, max=None if math.isinf(hi) else hi)   # (b, L, H)


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, L) document labels -> (b, L) int64 counter, 0 at t = 0, +1 wherever the label changes.

    Equal counters mean "same document, no reset in between", even if a label comes back later.
    """
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()           # (b, L-1)
    return F.pad(torch.cumsum(change, dim=1), (1, 0))              # (b, L)


def skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None,
                  z: torch.Tensor | None) -> torch.Tensor:
    """y + D x, then times silu(z): y, x, z (b, L, H, P); D (H,) or (H, P)."""
    if D is not None:
        y = y + x * (D.unsqueeze(-1) if D.dim() == 1 else D)       # (b, L, H, P)
    if z is not None:
        y = y * F.silu(z)                                          # (b, L, H, P)
    return y


def ssd_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
            dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """The sequential definition, one time step at a time; returns (y (b, L, H, P), final (b, H, P, N)).

    x (b, L, H, P), dt (b, L, H), A (H,), B, C (b, L, G, N), initial_states (b, H, P, N),
    seq_idx (b, L) int: the state is reset to zero before every token whose label differs from
    its predecessor's (initial_states feeds the first document of each row). Differentiable by
    autograd; use float64 inputs for ground truth.
    """
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit)          # (b, L, H)
    Bh = B.repeat_interleave(H // G, dim=2)                        # (b, L, H, N)
    Ch = C.repeat_interleave(H // G, dim=2)                        # (b, L, H, N)
    S = x.new_zeros(b, H, P, N) if initial_states is None else initial_states  # (b, H, P, N)
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)               # (b,)
            S = S * keep[:, None, None, None]                                      # (b, H, P, N)
        decay = torch.exp(dt[:, t] * A)                                            # (b, H)
        inp = (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * Bh[:, t].unsqueeze(-2)  # (b, H, P, N)
        S = decay[:, :, None, None] * S + inp                                      # (b, H, P, N)
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch[:, t]))                      # (b, H, P)
    y = torch.stack(ys, dim=1)                                     # (b, L, H, P)
    return skip_and_gate(y, x, D, z), S
