"""Dispatcher for the Cauchy product (being built in issue #3; reference path for now)."""
from __future__ import annotations

import torch

from kernels._triton import choose_backend
from kernels.cauchy.reference import cauchy_ref


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, *, symmetric: bool = False,
           backend: str = "auto") -> torch.Tensor:
    """out[..., j] = sum_n v[..., n] / (z[j] - w[..., n]): complex -> complex (..., M)."""
    choose_backend(backend, v, z, w)
    return cauchy_ref(v, z, w, symmetric)
