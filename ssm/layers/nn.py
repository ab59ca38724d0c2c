"""Small shared pieces for the layers: activations, length masks, a padding-aware norm, dropout
tied across the sequence, and a wrapper that lets a sequence layer sit in `nn.Sequential`.

Right-padded batches carry `lengths` (B,); `length_mask` turns them into a (B, L) bool mask and
`MaskedNorm` keeps padded positions out of batch-norm statistics, so padding never changes the
outputs at real positions.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
NORMS = ("layer", "batch", "none")


def activation(name: str) -> nn.Module:
    """Module for an activation name in ACTIVATIONS."""
    table = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "identity": nn.Identity}
    if name not in table:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return table[name]()


def check_lengths(lengths: torch.Tensor | None, batch: int, L: int) -> torch.Tensor | None:
    """Validate `lengths` (B,) integer with 1 <= lengths <= L; returns it as long."""
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.is_complex():
        raise TypeError(f"lengths must be an integer tensor of shape ({batch},), got {lengths!r}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if not torch.compiler.is_compiling() and bool(((lengths < 1) | (lengths > L)).any()):
        raise ValueError(f"lengths must lie in [1, {L}], got min {int(lengths.min())}, max {int(lengths.max())}")
    return lengths.long()


def check_finite(x: torch.Tensor, lengths: torch.Tensor | None, name: str = "x") -> None:
    """ValueError naming the first non-finite entry of x (B, L, ...) or (B, H) at a real position.

    Padded positions (beyond `lengths`) are not checked: layers replace them by zeros. Layers
    call this unless built with `check_finite=False` (skips one pass over x and a host sync).
    """
    if torch.compiler.is_compiling() or x.is_complex() or not x.is_floating_point():
        return
    bad = ~torch.isfinite(x)
    if lengths is not None and x.dim() >= 2:
        bad = bad & length_mask(lengths, x.shape[1]).view(x.shape[:2] + (1,) * (x.dim() - 2))
    if bool(bad.any()):
        idx = [int(i) for i in bad.nonzero()[0]]
        where = (f"batch {idx[0]}, position {idx[1]}, feature {idx[2]}" if x.dim() == 3
                 else ", ".join(f"dim {d} = {i}" for d, i in enumerate(idx)))
        raise ValueError(f"{name} has a non-finite value ({float(x[tuple(idx)])}) at {where}; inputs must be "
                         "finite (a NaN/Inf would spread through the FFT convolution to other positions). "
                         "Build the layer with check_finite=False to skip this check")


class ConfigAttributes:
    """Mixin for a layer that keeps its settings in `self.config` (a dataclass): the settings read
    as attributes (`layer.d_state`, `layer.d_conv`, ...). Put it before `nn.Module` in the bases."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is not None and name in type(config).__dataclass_fields__:
                return getattr(config, name)
            raise


def keyword_only(*names: str):
    """Decorator for `forward(self, x, *, state=None, lengths=None, ...)`: a positional `state` or
    `lengths` (the order of older versions) raises a TypeError naming the keyword spelling."""
    def wrap(fn):
        @functools.wraps(fn)
        def forward(self, x, *args, **kwargs):
            if args:
                raise TypeError(f"{type(self).__name__}.forward takes {', '.join(names)} as keyword arguments "
                                f"only: call it as forward(x, {', '.join(n + '=...' for n in names)}); "
                                f"got {len(args)} extra positional argument(s)")
            return fn(self, x, **kwargs)
        return forward
    return wrap


def length_mask(lengths: torch.Tensor, L: int) -> torch.Tensor:
    """(B,) lengths -> (B, L) bool, True at real positions."""
    return torch.arange(L, device=lengths.device) < lengths[:, None]   # (B, L)


class MaskedNorm(nn.Module):
    """LayerNorm or BatchNorm over the feature dim of (B, L, H), ignoring padded positions.

    Batch norm in training mode takes its statistics (and updates its running averages) over
    real positions only; in eval mode it uses the running averages, as usual.
    """

    def __init__(self, d_model: int, *, kind: str = "layer", momentum: float = 0.1, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
        self.kind = kind
        if kind == "layer":
            self.norm = nn.LayerNorm(d_model, eps=eps, device=device, dtype=dtype)
        elif kind == "batch":
            self.norm = nn.BatchNorm1d(d_model, eps=eps, momentum=momentum, device=device, dtype=dtype)
        else:
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind != "batch":
            return self.norm(x)
        bn = self.norm
        if not self.training or lengths is None:
            return bn(x.transpose(1, 2)).transpose(1, 2)               # (B, L, H)
        mask = length_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)   # (B, L, 1)
        count = mask.sum()
        mean = (x * mask).sum((0, 1)) / count                          # (H,)
        var = (((x - mean) * mask) ** 2).sum((0, 1)) / count           # (H,) biased
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp_min(1)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), bn.momentum)
            bn.running_var.lerp_(unbiased.detach().to(bn.running_var.dtype), bn.momentum)
            bn.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias   # (B, L, H)

    def step(self, x_t: torch.Tensor) -> torch.Tensor:
        """One position (B, H): running statistics for batch norm (inference)."""
        if self.kind != "batch":
            return self.norm(x_t)
        bn = self.norm
        return (x_t - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


class SequenceDropout(nn.Dropout):
    """`nn.Dropout` for (B, L, H) sequences; `tie=True` shares one mask along the sequence.

    Tied: one keep/drop draw per (example, feature), the same at every position (like
    `nn.Dropout1d` on the (B, H, L) layout), kept values scaled by 1/(1-p). Untied it is exactly
    `nn.Dropout` (elementwise). Inputs that are not (B, L, H), e.g. one step (B, H), are dropped
    elementwise: a single call cannot know the mask of earlier steps.
    """

    def __init__(self, p: float = 0.5, *, tie: bool = False):
        super().__init__(p)
        if not isinstance(tie, bool):
            raise TypeError(f"tie_dropout must be a bool, got {tie!r}")
        self.tie = tie

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.tie and self.training and self.p > 0 and x.dim() == 3):
            return super().forward(x)
        if self.p >= 1:
            return x * 0.0
        keep = torch.empty(x.shape[0], 1, x.shape[2], dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1 - self.p).div_(1 - self.p)    # (B, L, H), mask (B, 1, H)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", tie=True" if self.tie else "")


class SequenceOnly(nn.Module):
    """Wrap a sequence layer that returns `(y, state)` so that it returns `y` only.

    For `nn.Sequential`: `nn.Sequential(ssm.SequenceOnly(ssm.S4(64)), nn.GELU(), ...)`. Extra
    arguments (`state`, `lengths`, `rate`) are passed through; the next state is dropped, so use
    the wrapped layer (`.layer`) directly for streaming.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module returning (y, state), got {type(layer).__name__}")
        self.layer = layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.layer(x, *args, **kwargs)[0]
