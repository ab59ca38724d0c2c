"""Vandermonde product, plain PyTorch (SPEC sections 3 and 4): the ground truth.

out[..., l] = 2 Re sum_n v[..., n] exp(x[..., n] * l),  l = 0..L-1.
No Triton import here.
"""
from __future__ import annotations

import torch


def vandermonde_ref(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """The readable formula; materializes (..., N, L). Use complex128 inputs for ground truth."""
    l = torch.arange(L, device=x.device, dtype=x.real.dtype)      # (L,)
    vander = torch.exp(x.unsqueeze(-1) * l)                         # (..., N, L)
    return 2 * torch.einsum("...n,...nl->...l", v, vander).real    # (..., L)
