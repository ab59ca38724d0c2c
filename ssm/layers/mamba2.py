"""The Mamba-2 layer: scalar decay per head, chunked SSD scan, gated RMSNorm.

`Mamba2(d_model, d_state=128, *, headdim=64, ngroups=1, ...)` has the constructor arguments,
parameter names and shapes of the public Mamba-2 module, so its `state_dict` loads as is. Per
token (docs/selective.md, "Block structure"): in_proj -> [z0, x0, z, xBC, dt_raw] (z0, x0: the
optional gated-MLP channels beyond d_ssm); causal depthwise conv1d + SiLU on xBC = [x, B, C];
dt = clamp(softplus(dt_raw + dt_bias), dt_limit); the SSD scan (`kernels.ssd`) with skip D; the
gated RMSNorm (`GatedRMSNorm`); out_proj. Settings: `ssm.config.Mamba2Config`.

Streaming state: `(conv_state (B, conv_dim, d_conv), ssm_state (B, nheads, headdim, N))` with
conv_dim = d_ssm + 2 ngroups N, in the layouts of the public module; the SSM state is float32
(float64 for a float64 layer).

Packed documents (`seq_idx`, docs/packing.md): the convolution's taps stop at each document's
start and the SSD scan restarts from zero there; a given `state` feeds each row's first document.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.selective_scan import selective_state_update
from kernels.ssd import ssd
from ssm.config import Mamba2Config, build, keyword_signature
from ssm.layers.causal_conv import causal_conv_silu
from ssm.layers.mamba import (
    BACKENDS,
    check_dt_range,
    check_int,
    check_packing,
    check_state,
    check_x,
    conv_step,
    dt_bias_init,
    next_conv_state,
)
from ssm.layers.nn import ConfigAttributes, check_lengths, keyword_only, length_mask


class _GatedRMSNormFn(torch.autograd.Function):
    """The gated RMSNorm in float32 (or wider) with a hand-written backward that keeps only y, z and
    the (..., groups) reciprocal norms (autograd kept five full-size tensors)."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps, norm_before_gate):
        f = torch.promote_types(y.dtype, torch.float32)
        gate = F.silu(z.to(f))                                        # (..., d)
        h = y.to(f) if norm_before_gate else y.to(f) * gate
        g = h.unflatten(-1, (-1, group_size))                         # (..., groups, group_size)
        ms = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_().div_(group_size)
        r = ms.add_(eps).rsqrt_()                                     # (..., groups, 1)
        out = (g * r).flatten(-2).mul_(weight.to(f))
        if norm_before_gate:
            out = out.mul_(gate)
        ctx.save_for_backward(y, z, weight, r)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        return out.to(y.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        y, z, weight, r = ctx.saved_tensors
        f = torch.promote_types(y.dtype, torch.float32)
        zf, yf, w, gs = z.to(f), y.to(f), weight.to(f), ctx.group_size
        gate = F.silu(zf)
        h = yf if ctx.norm_before_gate else yf * gate
        n = h.unflatten(-1, (-1, gs)) * r                              # (..., groups, gs): normalized h
        go = gout.to(f) * gate if ctx.norm_before_gate else gout.to(f)
        dw = (go * n.flatten(-2)).flatten(0, -2).sum(0)               # (d,)
        gn = (go * w).unflatten(-1, (-1, gs))                         # (..., groups, gs)
        m = torch.linalg.vecdot(gn, n).div_(gs).unsqueeze(-1)         # (..., groups, 1)
        dh = gn.addcmul_(n, m, value=-1).mul_(r).flatten(-2)          # (..., d)
        silu_grad = torch.ops.aten.silu_backward                     # (g, z) -> g silu'(z)
        if ctx.norm_before_gate:
            dy, dz = dh, silu_grad(n.flatten(-2).mul_(w).mul_(gout.to(f)), zf)
        else:
            dz = silu_grad(yf * dh, zf)
            dy = dh.mul_(gate)
        return dy.to(y.dtype), dz.to(z.dtype), dw.to(weight.dtype), None, None, None


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of `group_size` channels, gated by silu(z): norm(y * silu(z)) * weight,
    or norm(y) * weight * silu(z) with `norm_before_gate`. Computed in float32 (or wider), with a
    hand-written backward (`_GatedRMSNormFn`)."""

    def __init__(self, d: int, *, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return _GatedRMSNormFn.apply(y, z, self.weight, self.group_size, self.eps, self.norm_before_gate)


def _check_config(cfg: Mamba2Config, d_model: int) -> tuple[int, int]:
    """Validate every setting (ValueError naming it); returns (d_ssm, nheads)."""
    for name in ("d_model", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
        check_int(name, d_model if name == "d_model" else getattr(cfg, name))
    d_inner = cfg.expand * d_model
    d_ssm = d_inner if cfg.d_ssm is None else cfg.d_ssm
    check_int("d_ssm", d_ssm)
    if d_ssm > d_inner:
        raise ValueError(f"d_ssm must be <= d_inner = expand * d_model = {d_inner}, got d_ssm={d_ssm}")
    if d_ssm % cfg.headdim:
        raise ValueError(f"headdim must divide d_ssm = {d_ssm}, got headdim={cfg.headdim}")
    nheads = d_ssm // cfg.headdim
    if nheads % cfg.ngroups or d_ssm % cfg.ngroups:
        raise ValueError(f"ngroups must divide nheads = {nheads}, got ngroups={cfg.ngroups}")
    lo_hi = cfg.A_init_range
    if not (isinstance(lo_hi, (tuple, list)) and len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1]):
        raise ValueError(f"A_init_range must be a pair (lo, hi) with 0 < lo <= hi, got {lo_hi!r}")
    lim = cfg.dt_limit
    if not (isinstance(lim, (tuple, list)) and len(lim) == 2 and 0 <= lim[0] <= lim[1]):
        raise ValueError(f"dt_limit must be a pair (lo, hi) with 0 <= lo <= hi, got {lim!r}")
    check_dt_range(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
    if cfg.conv_init is not None and not (isinstance(cfg.conv_init, (int, float)) and cfg.conv_init > 0):
        raise ValueError(f"conv_init must be None or a number > 0, got {cfg.conv_init!r}")
    if not (isinstance(cfg.norm_eps, (int, float)) and cfg.norm_eps >= 0):
        raise ValueError(f"norm_eps must be a number >= 0, got {cfg.norm_eps!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    return d_ssm, nheads


class Mamba2(ConfigAttributes, nn.Module):
    """Mamba-2 layer on (B, L, d_model) sequences; see the module docstring.

    Every keyword is a field of `Mamba2Config` (defaults live there). Parameter kinds
    (`param_kinds`): A_log "A", dt_bias "dt", D "D".
    """

    def __init__(self, d_model: int, d_state: int | None = None, *, config: Mamba2Config | None = None,
                 device=None, dtype=None, **options):
        super().__init__()
        if d_state is not None:
            options["d_state"] = d_state
        cfg = build(Mamba2Config, config, options, "Mamba2")
        d_ssm, H = _check_config(cfg, d_model)
        fk = dict(device=device, dtype=dtype)
        N, G = cfg.d_state, cfg.ngroups
        d_inner = cfg.expand * d_model
        self.config, self.d_model, self.d_inner, self.d_ssm, self.nheads = cfg, d_model, d_inner, d_ssm, H
        self.conv_dim = d_ssm + 2 * G * N
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * G * N + H, bias=cfg.bias, **fk)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias, **fk)
        if cfg.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -cfg.conv_init, cfg.conv_init)
        self.dt_bias = nn.Parameter(dt_bias_init(H, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, device))
        A = torch.empty(H, dtype=torch.float32, device=device).uniform_(*cfg.A_init_range)   # (H,)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_ssm if cfg.D_has_hdim else H, device=device))
        if cfg.rmsnorm:
            self.norm = GatedRMSNorm(d_ssm, group_size=d_ssm // G, eps=cfg.norm_eps,
                                     norm_before_gate=cfg.norm_before_gate, **fk)
        self.out_proj = nn.Linear(d_inner, d_model, bias=cfg.bias, **fk)
        self.param_kinds = {"A_log": "A", "dt_bias": "dt", "D": "D"}

    def _state_dtype(self) -> torch.dtype:
        return torch.promote_types(self.A_log.dtype, torch.float32)

    def _state_shapes(self, batch: int) -> tuple:
        cfg = self.config
        return (batch, self.conv_dim, cfg.d_conv), (batch, self.nheads, cfg.headdim, cfg.d_state)

    def default_state(self, batch_size: int, device=None) -> tuple:
        """Zero state: (conv_state (B, conv_dim, d_conv), ssm_state (B, nheads, headdim, N))."""
        check_int("batch_size", batch_size)
        device = self.A_log.device if device is None else device
        conv_shape, ssm_shape = self._state_shapes(batch_size)
        return (torch.zeros(conv_shape, device=device, dtype=self.conv1d.weight.dtype),
                torch.zeros(ssm_shape, device=device, dtype=self._state_dtype()))

    def _split(self, zxbcdt: torch.Tensor):
        d_mlp = self.d_inner - self.d_ssm
        return zxbcdt.split([d_mlp, d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _output(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Gated norm (or y alone when the scan applied the gate), the MLP channels, out_proj."""
        if self.config.rmsnorm:
            y = self.norm(y, z)
        if x0.shape[-1]:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    @keyword_only("state", "lengths")
    def forward(self, x: torch.Tensor, *, state: tuple | None = None, lengths: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None):
        """x (B, L, d_model) -> (y (B, L, d_model), next_state); next_state is None unless `state` is given.

        With `lengths` (right padding) the padded inputs are replaced by zeros and their steps dt
        by 0, so next_state is the state after each row's last real token. With `seq_idx` (B, L)
        (packed documents, not combined with `lengths`) every document runs as if alone, except
        that `state` feeds each row's first document; next_state is the last document's.
        """
        Bsz, L = x.shape[:2] if isinstance(x, torch.Tensor) and x.dim() == 3 else (0, 0)
        lengths = check_lengths(lengths, Bsz, L) if Bsz else lengths
        seq_idx = check_packing(seq_idx, lengths, Bsz, L) if Bsz else seq_idx
        check_x(x, self.d_model, 3, lengths, self.config.check_finite)
        if state is not None:
            state = check_state(state, self._state_shapes(Bsz), self.A_log.device)
        cfg, H, P, G, N = self.config, self.nheads, self.config.headdim, self.config.ngroups, self.config.d_state
        mask = None if lengths is None else length_mask(lengths, L)   # (B, L)
        if mask is not None:
            x = torch.where(mask[..., None], x, 0.0)
        z0, x0, z, xBC, dt = self._split(self.in_proj(x))             # (B, L, .) each
        conv_state, ssm_state = (None, None) if state is None else state
        u = xBC.transpose(1, 2)                                        # (B, conv_dim, L)
        xBC = causal_conv_silu(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state, seq_idx)  # (B, L, conv_dim)
        xs, Bm, Cm = xBC.split([self.d_ssm, G * N, G * N], dim=-1)
        f = self._state_dtype()
        dt_bias, softplus, limit = self.dt_bias.to(f), True, tuple(cfg.dt_limit)
        if mask is not None:
            # dt = 0 at padding: the state neither decays nor takes input there
            step = F.softplus(dt.to(f) + dt_bias).clamp(*limit)        # (B, L, H)
            dt, dt_bias, softplus, limit = torch.where(mask[..., None], step, 0.0), None, False, (0.0, math.inf)
        D = self.D.to(f).view(H, P) if cfg.D_has_hdim else self.D.to(f)
        out = ssd(xs.unflatten(-1, (H, P)), dt, -torch.exp(self.A_log.to(f)), Bm.unflatten(-1, (G, N)),
                  Cm.unflatten(-1, (G, N)), cfg.chunk_size, D=D, z=None if cfg.rmsnorm else z.unflatten(-1, (H, P)),
                  dt_bias=dt_bias, dt_softplus=softplus, dt_limit=limit,
                  initial_states=None if ssm_state is None else ssm_state.to(f), seq_idx=seq_idx,
                  return_final_states=state is not None, backend=cfg.backend)
        y, last = (out, None) if state is None else out
        y = self._output(y.flatten(-2), z, z0, x0)                     # (B, L, d_model)
        if state is None:
            return y, None
        return y, (next_conv_state(u, conv_state, lengths, seq_idx), last.to(ssm_state.dtype))

    def step(self, x_t: torch.Tensor, state: tuple):
        """One token: x_t (B, d_model), state (see default_state) -> (y_t (B, d_model), new state).

        The given state tensors are not modified.
        """
        check_x(x_t, self.d_model, 2, None, self.config.check_finite)
        conv_state, ssm_state = check_state(state, self._state_shapes(x_t.shape[0]), self.A_log.device)
        cfg, H, P, G, N = self.config, self.nheads, self.config.headdim, self.config.ngroups, self.config.d_state
        f = self._state_dtype()
        z0, x0, z, xBC, dt = self._split(self.in_proj(x_t))           # (B, .) each
        xBC, conv_state = conv_step(xBC, self.conv1d, conv_state)     # (B, conv_dim), (B, conv_dim, W)
        xs, Bm, Cm = xBC.split([self.d_ssm, G * N, G * N], dim=-1)
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f)).clamp(*cfg.dt_limit)   # (B, H)
        A = (-torch.exp(self.A_log.to(f)))[:, None, None].expand(H, P, N)     # (H, P, N)
        D = self.D.to(f).view(H, P) if cfg.D_has_hdim else self.D.to(f)[:, None].expand(H, P)
        ssm_state = ssm_state.clone()
        y = selective_state_update(ssm_state, xs.unflatten(-1, (H, P)), dt[..., None].expand(-1, H, P), A,
                                   Bm.unflatten(-1, (G, N)), Cm.unflatten(-1, (G, N)), D,
                                   z=None if cfg.rmsnorm else z.unflatten(-1, (H, P)))   # (B, H, P)
        return self._output(y.flatten(-2), z, z0, x0), (conv_state, ssm_state)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"d_model={self.d_model}, d_state={cfg.d_state}, d_conv={cfg.d_conv}, expand={cfg.expand}, "
                f"headdim={cfg.headdim}, ngroups={cfg.ngroups}, nheads={self.nheads}")


Mamba2.__init__.__signature__ = keyword_signature(Mamba2.__init__, Mamba2Config, after="config")
