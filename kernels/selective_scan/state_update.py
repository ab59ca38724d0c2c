"""One decoding step of the selective scan, in place on the state: `selective_state_update`.

Two layouts, as in the public Mamba reference:
- Mamba: state (batch, D, N), x, dt (batch, D), A (D, N), B, C (batch, N) or (batch, G, N) with G
  dividing D (channel d reads group d // (D / G)), D, dt_bias (D,), z (batch, D).
- Mamba-2: state (batch, H, P, N), x, dt, z (batch, H, P), A (H, P, N) (usually one scalar per head
  broadcast with stride 0), B, C (batch, G, N) with G dividing H, D, dt_bias (H, P).

    dt = softplus(dt + dt_bias) (when dt_softplus);  state = exp(dt A) state + dt B x
    y  = sum_n C state + D x,  y *= silu(z) when z is given

The Mamba layout is the Mamba-2 one with H = 1 head of P = D channels. Plain PyTorch (one token is
a few (batch, H, P, N) elementwise ops); the state is updated in place and y is returned in x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _fail(msg: str):
    raise ValueError(f"selective_state_update: {msg}")


def _check(state, x, dt, A, B, C, D, z, dt_bias):
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("dt_bias", dt_bias)):
        if t is None and name not in ("D", "z", "dt_bias"):
            raise TypeError(f"selective_state_update: {name} is required")
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_state_update: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t is not None and (t.is_complex() or not t.is_floating_point()):
            raise TypeError(f"selective_state_update: {name} must be a real floating tensor, got {t.dtype}")
    if state.dim() not in (3, 4):
        _fail(f"state must be (batch, D, N) or (batch, nheads, headdim, N), got {tuple(state.shape)}")
    lead = tuple(state.shape[:-1])
    for name, t, shape in (("x", x, lead), ("dt", dt, lead), ("z", z, lead), ("A", A, state.shape[1:]),
                           ("D", D, lead[1:]), ("dt_bias", dt_bias, lead[1:])):
        if t is not None and tuple(t.shape) != tuple(shape):
            _fail(f"{name} must have shape {tuple(shape)} for state {tuple(state.shape)}, got {tuple(t.shape)}")
    batch, N = state.shape[0], state.shape[-1]
    split = state.shape[1] if state.dim() == 4 else state.shape[1]  # heads (Mamba-2) or channels (Mamba)
    for name, M in (("B", B), ("C", C)):
        two_d = state.dim() == 3 and tuple(M.shape) == (batch, N)
        grouped = M.dim() == 3 and M.shape[0] == batch and M.shape[2] == N and split % M.shape[1] == 0
        if not (two_d or grouped):
            _fail(f"{name} must be (batch, G, N) with G dividing {split}" + (" or (batch, N)" if state.dim() == 3
                                                                             else "") + f", got {tuple(M.shape)}")


def _heads(M: torch.Tensor, H: int) -> torch.Tensor:
    """B or C (batch, G, N) -> (batch, H, 1, N), group g serving heads g*H/G .. (g+1)*H/G - 1."""
    return M.repeat_interleave(H // M.shape[1], dim=1)[:, :, None, :]


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Advance `state` by one token in place and return y (x's shape and dtype)."""
    _check(state, x, dt, A, B, C, D, z, dt_bias)
    if state.dim() == 3:
        # Mamba layout as Mamba-2 with P = 1 channel per "head": every channel is its own head, so
        # groups of channels map onto groups of heads.
        B2, C2 = ((M if M.dim() == 3 else M[:, None]) for M in (B, C))
        y = selective_state_update(state[:, :, None], x[..., None], dt[..., None], A[:, None], B2, C2,
                                   None if D is None else D[:, None], None if z is None else z[..., None],
                                   None if dt_bias is None else dt_bias[:, None], dt_softplus)
        return y[..., 0]
    f = torch.promote_types(state.dtype, torch.float32)
    H = state.shape[1]
    dt = dt.to(f) if dt_bias is None else dt.to(f) + dt_bias.to(f)  # (batch, H, P)
    dt = F.softplus(dt) if dt_softplus else dt
    xf = x.to(f)                                                    # (batch, H, P)
    new = torch.exp(dt[..., None] * A.to(f)) * state.to(f) \
        + (dt * xf)[..., None] * _heads(B.to(f), H)                 # (batch, H, P, N)
    state.copy_(new)
    y = (new * _heads(C.to(f), H)).sum(-1)                          # (batch, H, P)
    if D is not None:
        y = y + D.to(f) * xf
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(x.dtype)
