"""The Mamba layer (selective SSM with a diagonal state per channel) and the pieces Mamba-2 shares.

`Mamba(d_model, d_state=16, *, ...)` has the constructor arguments, parameter names and shapes of
the public Mamba module, so its `state_dict` loads as is. Per token (docs/selective.md):
in_proj -> [u, z]; causal depthwise conv1d + SiLU on u; x_proj -> [dt_raw, B, C];
dt = softplus(dt_proj(dt_raw)); the selective scan (`kernels.selective_scan`) with skip D;
y * silu(z); out_proj. Settings: `ssm.config.MambaConfig`.

Streaming state: `(conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, N))`. The conv state
holds the last d_conv inputs of the convolution (the public layout: the oldest column is shifted
out before it is read); the SSM state is float32 (float64 for a float64 layer).

Packed documents (`seq_idx`, docs/packing.md): the convolution's taps stop at each document's
start and the scan restarts from zero there; a given `state` feeds each row's first document.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.selective_scan import selective_scan, selective_state_update
from ssm.config import MambaConfig, build, keyword_signature
from ssm.discretize import log_dt_init
from ssm.layers.causal_conv import causal_conv_silu
from ssm.layers.nn import (
    ConfigAttributes,
    check_finite,
    check_lengths,
    keyword_only,
    length_mask,
)
from ssm.packing import check_seq_idx

BACKENDS = ("auto", "torch", "triton")
DT_INITS = ("random", "constant")


def check_int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def check_dt_range(dt_min, dt_max, dt_init_floor) -> None:
    for name, v in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")


def dt_bias_init(n: int, dt_min: float, dt_max: float, floor: float, device=None) -> torch.Tensor:
    """(n,) float32: softplus^-1 of dt, dt log-uniform in [dt_min, dt_max] and at least `floor`."""
    dt = torch.exp(log_dt_init(n, dt_min, dt_max, device=device).double()).clamp(min=floor)  # (n,)
    # softplus^-1(dt) = log(exp(dt) - 1), written so that it does not overflow for large dt
    return (dt + torch.log(-torch.expm1(-dt))).float()


def check_x(x, d_model: int, rank: int, lengths=None, finite: bool = True) -> None:
    want = f"(B, L, {d_model})" if rank == 3 else f"(B, {d_model})"
    if not isinstance(x, torch.Tensor) or x.dim() != rank or x.shape[-1] != d_model:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape {want}, got {got}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if x.shape[0] == 0 or (rank == 3 and x.shape[1] == 0):
        raise ValueError(f"x must have batch size and length >= 1, got shape {tuple(x.shape)}")
    if finite:
        check_finite(x, lengths, "x")


def check_state(state, shapes: tuple, device) -> tuple:
    """`state` must be a (conv_state, ssm_state) pair of the given shapes on `device`."""
    if not isinstance(state, (tuple, list)) or len(state) != 2 or \
            not all(isinstance(s, torch.Tensor) for s in state):
        raise TypeError(f"state must be a pair (conv_state, ssm_state) of tensors of shapes {shapes} "
                        f"(see default_state), got {type(state).__name__}")
    for name, s, shape in zip(("conv_state", "ssm_state"), state, shapes):
        if tuple(s.shape) != tuple(shape):
            raise ValueError(f"state: {name} must have shape {tuple(shape)} (see default_state), "
                             f"got {tuple(s.shape)}")
        if s.device != device:
            raise ValueError(f"state: {name} must be on the layer's device {device}, got {s.device}")
    return tuple(state)


def check_packing(seq_idx, lengths, batch: int, L: int) -> torch.Tensor | None:
    """Validate `seq_idx` (B, L) for a selective layer; it excludes `lengths` (pack without padding,
    or give padding its own document)."""
    if seq_idx is None:
        return None
    if lengths is not None:
        raise ValueError("seq_idx and lengths cannot be combined: a packed row has no right padding "
                         "(put any padding in a document of its own)")
    return check_seq_idx(seq_idx, batch, L)


def causal_conv(u: torch.Tensor, conv: nn.Conv1d, conv_state: torch.Tensor | None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution + SiLU of u (B, C, L), continuing from `conv_state` (B, C, W):
    `causal_conv_silu` on the channels-last view (u is usually a transposed projection output).

    With `seq_idx` (B, L) no tap reaches back past its token's document start (the first
    document may still reach into `conv_state`).
    """
    v = causal_conv_silu(u.transpose(1, 2), conv.weight[:, 0], conv.bias, conv_state, seq_idx)   # (B, L, C)
    return v.transpose(1, 2)                                           # (B, C, L)


def next_conv_state(u: torch.Tensor, conv_state: torch.Tensor, lengths: torch.Tensor | None,
                    seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The last W convolution inputs after each row's last real token: (B, C, W).

    With `seq_idx`, the last document's inputs only (zeros before its start)."""
    W = conv_state.shape[-1]
    if seq_idx is not None:
        last = (seq_idx == seq_idx[:, -1:])                            # (B, L): the last document
        u = u * last[:, None, :].to(u.dtype)
        conv_state = conv_state * last[:, :1, None].to(conv_state.dtype)   # kept if it is also the first
    seq = torch.cat([conv_state.to(u.dtype), u], -1)                  # (B, C, W+L)
    if lengths is None:
        return seq[..., -W:].to(conv_state.dtype)
    idx = lengths[:, None] + torch.arange(W, device=u.device)         # (B, W)
    idx = idx[:, None, :].expand(-1, u.shape[1], -1)                   # (B, C, W)
    return seq.gather(-1, idx).to(conv_state.dtype)


def conv_step(u_t: torch.Tensor, conv: nn.Conv1d, conv_state: torch.Tensor):
    """One token u_t (B, C) through the causal convolution + SiLU -> (out (B, C), new conv_state)."""
    conv_state = torch.cat([conv_state[..., 1:], u_t[..., None].to(conv_state.dtype)], -1)  # (B, C, W)
    out = (conv_state.to(u_t.dtype) * conv.weight[:, 0, :]).sum(-1)   # (B, C)
    if conv.bias is not None:
        out = out + conv.bias
    return F.silu(out), conv_state


def _check_config(cfg: MambaConfig, d_model: int) -> int:
    """Validate every setting (ValueError naming it); returns dt_rank."""
    check_int("d_model", d_model)
    check_int("d_state", cfg.d_state)
    check_int("d_conv", cfg.d_conv)
    check_int("expand", cfg.expand)
    check_dt_range(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
    if cfg.dt_init not in DT_INITS:
        raise ValueError(f"dt_init must be one of {DT_INITS}, got {cfg.dt_init!r}")
    if isinstance(cfg.dt_scale, bool) or not isinstance(cfg.dt_scale, (int, float)) or cfg.dt_scale < 0:
        raise ValueError(f"dt_scale must be a number >= 0, got {cfg.dt_scale!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if cfg.dt_rank == "auto":
        return math.ceil(d_model / 16)
    check_int("dt_rank", cfg.dt_rank)
    return cfg.dt_rank


class Mamba(ConfigAttributes, nn.Module):
    """Mamba selective SSM layer on (B, L, d_model) sequences; see the module docstring.

    Every keyword is a field of `MambaConfig` (defaults live there); `Mamba(d_model,
    config=MambaConfig(...))` takes a whole config. Parameter kinds (`param_kinds`): A_log "A",
    dt_proj.bias "dt", D "D".
    """

    def __init__(self, d_model: int, d_state: int | None = None, *, config: MambaConfig | None = None,
                 device=None, dtype=None, **options):
        super().__init__()
        if d_state is not None:
            options["d_state"] = d_state
        cfg = build(MambaConfig, config, options, "Mamba")
        dt_rank = _check_config(cfg, d_model)
        fk = dict(device=device, dtype=dtype)
        D, N = cfg.expand * d_model, cfg.d_state
        self.config, self.d_model, self.d_inner, self.dt_rank = cfg, d_model, D, dt_rank
        self.in_proj = nn.Linear(d_model, 2 * D, bias=cfg.bias, **fk)
        self.conv1d = nn.Conv1d(D, D, cfg.d_conv, groups=D, padding=cfg.d_conv - 1, bias=cfg.conv_bias, **fk)
        self.x_proj = nn.Linear(D, dt_rank + 2 * N, bias=False, **fk)
        self.dt_proj = nn.Linear(dt_rank, D, bias=True, **fk)
        std = dt_rank ** -0.5 * cfg.dt_scale
        with torch.no_grad():
            if cfg.dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            self.dt_proj.bias.copy_(dt_bias_init(D, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, device))
        A = torch.arange(1, N + 1, dtype=torch.float32, device=device).expand(D, N)   # (D, N)
        self.A_log = nn.Parameter(torch.log(A).contiguous())
        self.D = nn.Parameter(torch.ones(D, device=device))
        self.out_proj = nn.Linear(D, d_model, bias=cfg.bias, **fk)
        self.param_kinds = {"A_log": "A", "D": "D"}
        self.dt_proj.param_kinds = {"bias": "dt"}

    def _state_dtype(self) -> torch.dtype:
        return torch.promote_types(self.A_log.dtype, torch.float32)

    def default_state(self, batch_size: int, device=None) -> tuple:
        """Zero state: (conv_state (B, d_inner, d_conv) in the weights' dtype, ssm_state (B, d_inner, N))."""
        check_int("batch_size", batch_size)
        device = self.A_log.device if device is None else device
        D = self.d_inner
        return (torch.zeros(batch_size, D, self.config.d_conv, device=device, dtype=self.conv1d.weight.dtype),
                torch.zeros(batch_size, D, self.config.d_state, device=device, dtype=self._state_dtype()))

    def _state_shapes(self, batch: int) -> tuple:
        return (batch, self.d_inner, self.config.d_conv), (batch, self.d_inner, self.config.d_state)

    @keyword_only("state", "lengths")
    def forward(self, x: torch.Tensor, *, state: tuple | None = None, lengths: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None):
        """x (B, L, d_model) -> (y (B, L, d_model), next_state); next_state is None unless `state` is given.

        With `lengths` (right padding) the padded inputs are replaced by zeros and their steps dt
        by 0 (the state stands still there), so next_state is the state after each row's last
        real token; outputs at padded positions are meaningless. With `seq_idx` (B, L) (packed
        documents, not combined with `lengths`) every document runs as if alone, except that
        `state` feeds each row's first document; next_state is the last document's.
        """
        Bsz, L = x.shape[:2] if isinstance(x, torch.Tensor) and x.dim() == 3 else (0, 0)
        lengths = check_lengths(lengths, Bsz, L) if Bsz else lengths
        seq_idx = check_packing(seq_idx, lengths, Bsz, L) if Bsz else seq_idx
        check_x(x, self.d_model, 3, lengths, self.config.check_finite)
        if state is not None:
            state = check_state(state, self._state_shapes(Bsz), self.A_log.device)
        mask = None if lengths is None else length_mask(lengths, L)   # (B, L)
        if mask is not None:
            x = torch.where(mask[..., None], x, 0.0)
        N, R = self.config.d_state, self.dt_rank
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)        # (B, D, L) each
        conv_state, ssm_state = (None, None) if state is None else state
        v = causal_conv(u, self.conv1d, conv_state, seq_idx)          # (B, D, L)
        dt_raw, Bm, Cm = self.x_proj(v.transpose(1, 2)).split([R, N, N], dim=-1)   # (B, L, R|N|N)
        delta = F.linear(dt_raw, self.dt_proj.weight).transpose(1, 2)  # (B, D, L)
        f = self._state_dtype()
        A = -torch.exp(self.A_log.to(f))                              # (D, N)
        bias, softplus = self.dt_proj.bias.to(f), True
        if mask is not None:
            # dt = 0 at padding: the state neither decays nor takes input there
            delta = torch.where(mask[:, None, :], F.softplus(delta + bias[:, None].to(delta.dtype)), 0.0)
            bias, softplus = None, False
        out = selective_scan(v, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D.to(f), z=z,
                             delta_bias=bias, delta_softplus=softplus, return_last_state=state is not None,
                             initial_state=None if ssm_state is None else ssm_state.to(self._state_dtype()),
                             backend=self.config.backend, seq_idx=seq_idx)
        if state is None:
            return self.out_proj(out.transpose(1, 2)), None
        y, last = out
        next_state = (next_conv_state(u, conv_state, lengths, seq_idx), last.to(ssm_state.dtype))
        return self.out_proj(y.transpose(1, 2)), next_state

    def step(self, x_t: torch.Tensor, state: tuple):
        """One token: x_t (B, d_model), state (see default_state) -> (y_t (B, d_model), new state).

        The given state tensors are not modified.
        """
        check_x(x_t, self.d_model, 2, None, self.config.check_finite)
        conv_state, ssm_state = check_state(state, self._state_shapes(x_t.shape[0]), self.A_log.device)
        N, R, f = self.config.d_state, self.dt_rank, self._state_dtype()
        u, z = self.in_proj(x_t).chunk(2, dim=-1)                     # (B, D) each
        v, conv_state = conv_step(u, self.conv1d, conv_state)         # (B, D), (B, D, W)
        dt_raw, Bm, Cm = self.x_proj(v).split([R, N, N], dim=-1)      # (B, R|N|N)
        dt = F.linear(dt_raw, self.dt_proj.weight)                    # (B, D)
        ssm_state = ssm_state.clone()
        y = selective_state_update(ssm_state, v, dt, -torch.exp(self.A_log.to(f)), Bm, Cm, self.D.to(f),
                                   z=z, dt_bias=self.dt_proj.bias.to(f), dt_softplus=True)   # (B, D)
        return self.out_proj(y), (conv_state, ssm_state)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"d_model={self.d_model}, d_state={cfg.d_state}, d_conv={cfg.d_conv}, expand={cfg.expand}, "
                f"dt_rank={self.dt_rank}")


Mamba.__init__.__signature__ = keyword_signature(Mamba.__init__, MambaConfig, after="config")
