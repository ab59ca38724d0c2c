"""Cauchy product, plain PyTorch (SPEC sections 3 and 4): the ground truth.

out[..., j] = sum_n v[..., n] / (z[j] - w[..., n])   (+ conj(v)/(z - conj(w)) when symmetric).
No Triton import here.
"""
from __future__ import annotations

import torch


def cauchy_ref(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """The readable formula; materializes (..., N, M). v: (..., N), z: (M,), w broadcastable to v."""
    r = v.unsqueeze(-1) / (z - w.unsqueeze(-1))                            # (..., N, M)
    if symmetric:
        r = r + v.conj().unsqueeze(-1) / (z - w.conj().unsqueeze(-1))       # (..., N, M)
    return r.sum(dim=-2)                                                    # (..., M)
