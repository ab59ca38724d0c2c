"""The Mamba-3 layer: exponential-trapezoidal update, data-dependent rotations (complex state), SISO or MIMO.

`Mamba3(d_model, d_state=128, *, headdim=64, ngroups=1, rope_fraction=0.5, is_mimo=False, ...)`
has the constructor arguments, parameter names and shapes of the public Mamba-3 module, so its
`state_dict` loads as is. Per token (docs/mamba3.md, "Data-dependent parameters"): in_proj ->
[z, x, B, C, dd_dt, dd_A, trap, angle]; dt = softplus(dd_dt + dt_bias);
A = min(-heavy_tail(dd_A), -A_floor); lam = sigmoid(trap); theta = pi tanh(angle) (shared by the
heads); B, C RMS-normalised (`B_norm`, `C_norm`); the scan `kernels.mamba3.mamba3_scan` with the
per-head biases `B_bias`, `C_bias`, skip D and gate silu(z) (or, with `is_outproj_norm`, a gated
RMSNorm per head); out_proj. No convolution. MIMO lifts x and z to `mimo_rank` copies per head
(`mimo_x`, `mimo_z`) and sums the copies' outputs back (`mimo_o`). Settings: `ssm.config.Mamba3Config`.

Streaming state (`kernels.mamba3.Mamba3State`, a tuple of four tensors): angle (B, nheads, S),
ssm (B, nheads, headdim, d_state), B_prev (B, nheads, d_state) - (B, nheads, mimo_rank, d_state)
for MIMO - the previous token's rotated B, and x_prev (B, nheads, headdim), float32 (float64 for
a float64 layer). `step` uses real arithmetic only (cos/sin rotations), so it exports as is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.mamba3 import (
    Mamba3State,
    mamba3_mimo_step,
    mamba3_scan,
    mamba3_step,
    rotate_pairs,
)
from ssm.config import Mamba3Config, build, keyword_signature
from ssm.layers.mamba import (
    BACKENDS,
    check_dt_range,
    check_int,
    check_packing,
    check_x,
    dt_bias_init,
)
from ssm.layers.mamba2 import GatedRMSNorm
from ssm.layers.nn import ConfigAttributes, check_lengths, keyword_only, length_mask


def heavy_tail(v: torch.Tensor) -> torch.Tensor:
    """f(v) = 1 + v for v >= 0 and 1 / (1 - v) for v < 0: positive, continuous, slope 1 at 0."""
    return v.clamp_min(0) + torch.reciprocal(1 - v.clamp_max(0))


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in float32 (or wider)."""

    def __init__(self, d: int, *, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.promote_types(x.dtype, torch.float32)
        h = x.to(f)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(f)


def _check_config(cfg: Mamba3Config, d_model: int) -> tuple[int, int, int]:
    """Validate every setting (ValueError naming it); returns (nheads, rank, rotated pairs S)."""
    for name in ("d_model", "d_state", "expand", "headdim", "ngroups", "chunk_size", "mimo_rank"):
        check_int(name, d_model if name == "d_model" else getattr(cfg, name))
    d_inner = cfg.expand * d_model
    if d_inner % cfg.headdim:
        raise ValueError(f"headdim must divide expand * d_model = {d_inner}, got headdim={cfg.headdim}")
    H = d_inner // cfg.headdim
    if H % cfg.ngroups:
        raise ValueError(f"ngroups must divide nheads = {H}, got ngroups={cfg.ngroups}")
    if cfg.rope_fraction not in (0.5, 1.0):
        raise ValueError(f"rope_fraction must be 0.5 or 1.0, got {cfg.rope_fraction!r}")
    S = int(cfg.d_state * cfg.rope_fraction) // 2
    if S < 1:
        raise ValueError(f"d_state * rope_fraction must be >= 2 (one rotated pair), got d_state={cfg.d_state}")
    if cfg.is_mimo and cfg.d_state % 2:
        raise ValueError(f"MIMO rotates the pairs (i, d_state/2 + i): d_state must be even, got {cfg.d_state}")
    check_dt_range(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
    if isinstance(cfg.A_floor, bool) or not isinstance(cfg.A_floor, (int, float)) or cfg.A_floor < 0:
        raise ValueError(f"A_floor must be a number >= 0, got {cfg.A_floor!r}")
    for name in ("is_mimo", "is_outproj_norm", "fuse_pregate_headwise_norm", "check_finite"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(cfg, name)!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    return H, (cfg.mimo_rank if cfg.is_mimo else 1), S


class Mamba3(ConfigAttributes, nn.Module):
    """Mamba-3 layer on (B, L, d_model) sequences; see the module docstring.

    Every keyword is a field of `Mamba3Config` (defaults live there). Parameter kinds
    (`param_kinds`): dt_bias "dt", D "D".
    """

    def __init__(self, d_model: int, d_state: int | None = None, *, config: Mamba3Config | None = None,
                 device=None, dtype=None, **options):
        super().__init__()
        if d_state is not None:
            options["d_state"] = d_state
        cfg = build(Mamba3Config, config, options, "Mamba3")
        H, R, S = _check_config(cfg, d_model)
        fk = dict(device=device, dtype=dtype)
        N, G, P = cfg.d_state, cfg.ngroups, cfg.headdim
        self.config, self.d_model, self.d_inner, self.nheads = cfg, d_model, cfg.expand * d_model, H
        self.rank, self.num_rope_angles = R, S
        self.sizes = [self.d_inner, self.d_inner, R * G * N, R * G * N, H, H, H, S]
        self.in_proj = nn.Linear(d_model, sum(self.sizes), bias=False, **fk)
        self.dt_bias = nn.Parameter(dt_bias_init(H, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, device))
        self.B_bias = nn.Parameter(torch.ones(H, R, N, device=device))
        self.C_bias = nn.Parameter(torch.ones(H, R, N, device=device))
        self.B_norm = RMSNorm(N, **fk)
        self.C_norm = RMSNorm(N, **fk)
        if cfg.is_mimo:
            self.mimo_x = nn.Parameter(torch.full((H, R, P), 1.0 / R, device=device))
            self.mimo_z = nn.Parameter(torch.ones(H, R, P, device=device))
            self.mimo_o = nn.Parameter(torch.full((H, R, P), 1.0 / R, device=device))
        self.D = nn.Parameter(torch.ones(H, device=device))
        if cfg.is_outproj_norm:
            self.norm = GatedRMSNorm(self.d_inner, group_size=P, eps=1e-5, norm_before_gate=True, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **fk)
        self.param_kinds = {"dt_bias": "dt", "D": "D"}

    def _state_dtype(self) -> torch.dtype:
        return torch.promote_types(torch.promote_types(self.in_proj.weight.dtype, self.dt_bias.dtype), torch.float32)

    def _state_shapes(self, batch: int) -> tuple:
        H, P, N, R = self.nheads, self.config.headdim, self.config.d_state, self.rank
        B_prev = (batch, H, R, N) if self.config.is_mimo else (batch, H, N)
        return (batch, H, self.num_rope_angles), (batch, H, P, N), B_prev, (batch, H, P)

    def default_state(self, batch_size: int, device=None) -> Mamba3State:
        """Zero state: Mamba3State(angle, ssm, B_prev, x_prev), shapes in the module docstring."""
        check_int("batch_size", batch_size)
        device = self.dt_bias.device if device is None else device
        return Mamba3State(*(torch.zeros(s, device=device, dtype=self._state_dtype())
                             for s in self._state_shapes(batch_size)))

    def _check_state(self, state, batch: int) -> Mamba3State:
        shapes = self._state_shapes(batch)
        if not isinstance(state, (tuple, list)) or len(state) != 4 or \
                not all(isinstance(s, torch.Tensor) for s in state):
            raise TypeError(f"state must be a tuple (angle, ssm, B_prev, x_prev) of tensors of shapes {shapes} "
                            f"(see default_state), got {type(state).__name__}")
        for name, s, shape in zip(Mamba3State._fields, state, shapes):
            if tuple(s.shape) != shape:
                raise ValueError(f"state: {name} must have shape {shape} (see default_state), got {tuple(s.shape)}")
            if s.device != self.dt_bias.device:
                raise ValueError(f"state: {name} must be on the layer's device {self.dt_bias.device}, got {s.device}")
        return Mamba3State(*(s.to(self._state_dtype()) for s in state))

    def _project(self, u: torch.Tensor) -> dict:
        """in_proj and the activations: u (..., d_model) -> the scan's inputs (..., H, .), float32+."""
        cfg, f, H = self.config, self._state_dtype(), self.nheads
        z, x, B, C, dd_dt, dd_A, trap, angle = self.in_proj(u).split(self.sizes, dim=-1)
        lead = u.shape[:-1]
        shape = (self.rank, cfg.ngroups, cfg.d_state) if cfg.is_mimo else (cfg.ngroups, cfg.d_state)
        theta = math.pi * torch.tanh(angle.to(f))  # (..., S)
        return {"x": x.to(f).unflatten(-1, (H, cfg.headdim)), "z": z.to(f).unflatten(-1, (H, cfg.headdim)),
                "dt": F.softplus(dd_dt.to(f) + self.dt_bias.to(f)),
                "A": (-heavy_tail(dd_A.to(f))).clamp(max=-cfg.A_floor),
                "B": self.B_norm(B.unflatten(-1, shape)).to(f), "C": self.C_norm(C.unflatten(-1, shape)).to(f),
                "lam": torch.sigmoid(trap.to(f)),
                "theta": theta.unsqueeze(-2).expand(*lead, H, self.num_rope_angles)}

    def _biases(self) -> dict:
        f, mimo = self._state_dtype(), self.config.is_mimo
        out = {"D": self.D.to(f), "B_bias": self.B_bias.to(f), "C_bias": self.C_bias.to(f)}
        if not mimo:
            return {**out, "B_bias": out["B_bias"][:, 0], "C_bias": out["C_bias"][:, 0]}
        return {**out, "mimo_x": self.mimo_x.to(f), "mimo_z": self.mimo_z.to(f),
                "mimo_o": None if self.config.is_outproj_norm else self.mimo_o.to(f)}

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y (..., H, P) gated by the scan, or ungated (..., H, [r,] P) with is_outproj_norm."""
        if self.config.is_outproj_norm and self.config.is_mimo:
            z = self.mimo_z.to(z.dtype) * z.unsqueeze(-2)                # (..., H, r, P)
            y = self.norm(y.transpose(-3, -2).flatten(-2), z.transpose(-3, -2).flatten(-2))   # (..., r, H*P)
            y = (y.unflatten(-1, (self.nheads, -1)).transpose(-3, -2) * self.mimo_o.to(y.dtype)).sum(-2)
        elif self.config.is_outproj_norm:
            y = self.norm(y.flatten(-2), z.flatten(-2)).unflatten(-1, (self.nheads, -1))
        return self.out_proj(y.flatten(-2).to(dtype))

    @keyword_only("state", "lengths")
    def forward(self, x: torch.Tensor, *, state: tuple | None = None, lengths: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None):
        """x (B, L, d_model) -> (y (B, L, d_model), next_state); next_state is None unless `state` is given.

        With `lengths` (right padding) the padded inputs are replaced by zeros and their steps dt
        by 0, so next_state is the state after each row's last real token. With `seq_idx` (B, L)
        (packed documents, not combined with `lengths`) every document runs as if alone (state,
        angle and previous-token term restart), except that `state` feeds each row's first
        document; next_state is the last document's.
        """
        Bsz, L = x.shape[:2] if isinstance(x, torch.Tensor) and x.dim() == 3 else (0, 0)
        lengths = check_lengths(lengths, Bsz, L) if Bsz else lengths
        seq_idx = check_packing(seq_idx, lengths, Bsz, L) if Bsz else seq_idx
        check_x(x, self.d_model, 3, lengths, self.config.check_finite)
        init = None if state is None else self._check_state(state, Bsz)
        mask = None if lengths is None else length_mask(lengths, L)   # (B, L)
        if mask is not None:
            x = torch.where(mask[..., None], x, 0.0)
        p = self._project(x)
        if mask is not None:
            # dt = 0 at padding: no decay, no rotation, no input; the state stops at the last real token
            p["dt"] = torch.where(mask[..., None], p["dt"], 0.0)
        z = p.pop("z")
        gate = None if self.config.is_outproj_norm else z
        out = mamba3_scan(**p, **self._biases(), z=gate, initial_state=init, seq_idx=seq_idx,
                          chunk_size=self.config.chunk_size,
                          return_final_state=state is not None, backend=self.config.backend)
        y, final = (out, None) if state is None else out
        y = self._output(y, z, x.dtype)                                # (B, L, d_model)
        if state is not None and lengths is not None:
            final = self._last_real_token(p, final, lengths)
        return y, final

    def _last_real_token(self, p: dict, final: Mamba3State, lengths: torch.Tensor) -> Mamba3State:
        """The trapezoid's pending term belongs to each row's last real token, not to position L-1."""
        rows, last = torch.arange(lengths.shape[0], device=lengths.device), lengths - 1
        B = p["B"][rows, last]                                         # (B, [r,] G, N)
        Bh = B.repeat_interleave(self.nheads // self.config.ngroups, dim=-2)   # (B, [r,] H, N)
        bias = self.B_bias.to(Bh.dtype)
        if self.config.is_mimo:
            Bt = rotate_pairs(Bh.transpose(-3, -2) + bias, final.angle[:, :, None], half=True)   # (B, H, r, N)
        else:
            Bt = rotate_pairs(Bh + bias[:, 0], final.angle)            # (B, H, N)
        return Mamba3State(final.angle, final.ssm, Bt, p["x"][rows, last])

    def step(self, x_t: torch.Tensor, state: tuple):
        """One token: x_t (B, d_model), state (see default_state) -> (y_t (B, d_model), new state).

        The given state tensors are not modified.
        """
        check_x(x_t, self.d_model, 2, None, self.config.check_finite)
        st = self._check_state(state, x_t.shape[0])
        p = self._project(x_t)
        z = p.pop("z")
        gate = None if self.config.is_outproj_norm else z
        if self.config.is_mimo:
            y, st = mamba3_mimo_step(**p, state=st, **self._biases(), z=gate, half=True)
        else:
            y, st = mamba3_step(**p, state=st, **self._biases(), z=gate)
        return self._output(y, z, x_t.dtype), st

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"d_model={self.d_model}, d_state={cfg.d_state}, expand={cfg.expand}, headdim={cfg.headdim}, "
                f"ngroups={cfg.ngroups}, nheads={self.nheads}, rope_fraction={cfg.rope_fraction}, "
                f"mimo_rank={self.rank if cfg.is_mimo else 1}")


Mamba3.__init__.__signature__ = keyword_signature(Mamba3.__init__, Mamba3Config, after="config")
