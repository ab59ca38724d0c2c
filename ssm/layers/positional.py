"""Absolute position embeddings added at the model input, as in the LRA Transformer.

The formula: docs/rope.md#the-attention-module-and-its-kv-cache (last paragraph).

`AbsolutePositionalEmbedding(kind, d_model, max_len)` with kind "sinusoidal" (fixed, any length) or
"learned" (a table of `max_len` rows). Relative schemes (RoPE, ALiBi) live inside the attention
layer instead (`attention.py`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

KINDS = ("sinusoidal", "learned")


def sinusoidal_table(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """`pe[m, 2i] = sin(m / 10000^(2i/d))`, `pe[m, 2i+1] = cos(...)`: positions (...,) -> (..., d_model) float32."""
    i = torch.arange(0, d_model, 2, dtype=torch.float64, device=positions.device)
    ang = positions.to(torch.float64)[..., None] * torch.exp(-math.log(10000.0) * i / d_model)  # (..., ceil(d/2))
    pe = torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2)[..., :d_model]  # (..., d_model)
    return pe.to(torch.float32)


class AbsolutePositionalEmbedding(nn.Module):
    """x (B, L, H) -> x + pe[offset : offset + L].

    `offset` (int or LongTensor (B,)) is the position of the first token, for step-by-step
    decoding. "learned" raises for positions >= max_len; "sinusoidal" accepts any position
    (`max_len` may be None).
    """

    def __init__(self, kind: str, d_model: int, max_len: int | None = None, *, device=None, dtype=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        self.kind, self.d_model, self.max_len = kind, d_model, max_len
        if kind == "learned":
            if max_len is None or max_len < 1:
                raise ValueError(f"learned positions need max_len >= 1, got {max_len}")
            self.weight = nn.Parameter(torch.empty(max_len, d_model, device=device, dtype=dtype))
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, L, {self.d_model}), got shape {tuple(x.shape)}")
        b, length, _ = x.shape
        offset = torch.as_tensor(offset, device=x.device, dtype=torch.long)
        positions = offset.reshape(-1, 1) + torch.arange(length, device=x.device)  # (1 or B, L)
        if self.kind == "learned":
            top = int(positions.max()) if positions.numel() else 0
            if top >= self.max_len:
                raise ValueError(f"position {top} >= max_len {self.max_len} of the learned embedding")
            return x + self.weight[positions].to(x.dtype)
        return x + sinusoidal_table(positions, self.d_model).to(x.dtype)
