"""Small shared pieces for the layers: activations, length masks, a padding-aware norm.

Right-padded batches carry `lengths` (B,); `length_mask` turns them into a (B, L) bool mask and
`MaskedNorm` keeps padded positions out of batch-norm statistics, so padding never changes the
outputs at real positions.
"""
from __future__ import annotations

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
