"""`S4Block`: norm -> S4 -> dropout -> residual (-> optional GELU feed-forward), pre- or post-norm.

The residual block contract shared with `ssm.layers.attention.TransformerBlock`:
`Block(d_model, *, dropout=0.0, prenorm=True, device=None, dtype=None, <own keyword args>)`,
`forward(x (B, L, H), state=None, lengths=None) -> (y (B, L, H), next_state)`,
`default_state(batch_size, device=None)`, `step(x_t (B, H), state) -> (y_t, state)`.
The SSM itself is `ssm.layers.s4.S4` (docs/s4.md). `tie_dropout=True` ties every dropout of the
block (the S4 layer's, the residual branch's and the feed-forward's) across the sequence: one mask
per (example, feature), as the public S4 LRA configurations do (`ssm.layers.nn.SequenceDropout`).
"""
from __future__ import annotations

import torch
from torch import nn

from ssm.layers.nn import MaskedNorm, SequenceDropout
from ssm.layers.s4 import S4


class S4Block(nn.Module):
    """Residual S4/S4D block. `d_ff=None` means no feed-forward sublayer."""

    def __init__(self, d_model: int, *, dropout: float = 0.0, prenorm: bool = True, norm: str = "layer",
                 d_ff: int | None = None, d_state: int = 64, mode: str = "diag", init: str = "legs",
                 rank: int | None = None, bidirectional: bool = False, channels: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, discretization: str | None = None, activation: str = "gelu",
                 ssm_lr: float | None = 1e-3, l_max: int | None = None, backend: str = "auto",
                 n_ssm: int | None = None, dt_transform: str = "exp", dt_lr: float | None | str = "ssm_lr",
                 tie_dropout: bool = False, device=None, dtype=None):
        super().__init__()
        self.prenorm = prenorm
        self.layer = S4(d_model, d_state, mode=mode, init=init, rank=rank, bidirectional=bidirectional,
                        channels=channels, dt_min=dt_min, dt_max=dt_max, discretization=discretization,
                        activation=activation, dropout=dropout, ssm_lr=ssm_lr, l_max=l_max,
                        backend=backend, n_ssm=n_ssm, dt_transform=dt_transform, dt_lr=dt_lr,
                        tie_dropout=tie_dropout, device=device, dtype=dtype)
        self.norm = MaskedNorm(d_model, kind=norm, device=device, dtype=dtype)
        self.drop = SequenceDropout(dropout, tie=tie_dropout)
        self.ff = None
        if d_ff is not None:
            if isinstance(d_ff, bool) or not isinstance(d_ff, int) or d_ff < 1:
                raise ValueError(f"d_ff must be None or an int >= 1, got {d_ff!r}")
            self.norm_ff = MaskedNorm(d_model, kind=norm, device=device, dtype=dtype)
            self.ff = nn.Sequential(nn.Linear(d_model, d_ff, device=device, dtype=dtype), nn.GELU(),
                                    SequenceDropout(dropout, tie=tie_dropout),
                                    nn.Linear(d_ff, d_model, device=device, dtype=dtype))

    def default_state(self, batch_size: int, device=None) -> torch.Tensor:
        return self.layer.default_state(batch_size, device=device)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None):
        """x (B, L, H) -> (y (B, L, H), next_state); see `S4.forward` for `state` and `lengths`."""
        if self.prenorm:
            y, next_state = self.layer(self.norm(x, lengths), state, lengths)
            x = x + self.drop(y)                                       # (B, L, H)
            if self.ff is not None:
                x = x + self.drop(self.ff(self.norm_ff(x, lengths)))
            return x, next_state
        y, next_state = self.layer(x, state, lengths)
        x = self.norm(x + self.drop(y), lengths)                      # (B, L, H)
        if self.ff is not None:
            x = self.norm_ff(x + self.drop(self.ff(x)), lengths)
        return x, next_state

    def step(self, x_t: torch.Tensor, state: torch.Tensor):
        """One position: x_t (B, H) -> (y_t (B, H), state)."""
        if self.prenorm:
            y, state = self.layer.step(self.norm.step(x_t), state)
            x_t = x_t + self.drop(y)
            if self.ff is not None:
                x_t = x_t + self.drop(self.ff(self.norm_ff.step(x_t)))
            return x_t, state
        y, state = self.layer.step(x_t, state)
        x_t = self.norm.step(x_t + self.drop(y))
        if self.ff is not None:
            x_t = self.norm_ff.step(x_t + self.drop(self.ff(x_t)))
        return x_t, state
