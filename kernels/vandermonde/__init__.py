"""Dispatcher for the Vandermonde product (being built in issue #3; reference path for now)."""
from __future__ import annotations

import torch

from kernels._triton import choose_backend
from kernels.vandermonde.reference import vandermonde_ref


def vandermonde(v: torch.Tensor, x: torch.Tensor, L: int, *, backend: str = "auto") -> torch.Tensor:
    """out[..., l] = 2 Re sum_n v[..., n] exp(x[..., n] l): complex (..., N) -> real (..., L)."""
    choose_backend(backend, v, x)
    return vandermonde_ref(v, x, L)
