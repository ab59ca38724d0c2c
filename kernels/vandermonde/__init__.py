"""The Vandermonde product: public function `vandermonde_mult` (`docs/operators.md`, "Vandermonde operator").

    out[..., l] = 2 Re sum_n v[..., n] exp(x[..., n] l),   l = 0..L-1

`vandermonde_mult` validates, resolves the backend, flattens the leading dims to the canonical
rows v, x (R, N) and calls the `ssmkit::vandermonde` custom op (`op.py`), which runs the Triton
launchers (`triton_vandermonde.py`) or the chunked path (`reference.py`), so
`torch.compile(fullgraph=True)` traces a model that uses this function. Neither path ever
materializes a (..., N, L) tensor.
"""
from __future__ import annotations

import torch

from kernels._triton import choose_backend
from kernels.vandermonde.op import vandermonde_op
from kernels.vandermonde.reference import vandermonde_ref

__all__ = ["vandermonde_mult", "vandermonde_ref"]

_DTYPES = (torch.complex64, torch.complex128)


def _check(v, x, L) -> None:
    for name, t in (("v", v), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vandermonde_mult: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"vandermonde_mult: {name} must be complex64 or complex128, got {t.dtype}")
    if v.dtype != x.dtype:
        raise TypeError(f"vandermonde_mult: v and x must have the same dtype, got v {v.dtype} and x {x.dtype}")
    if isinstance(L, bool) or not isinstance(L, (int, torch.SymInt)):
        raise TypeError(f"vandermonde_mult: L must be an int, got {type(L).__name__}")
    if L < 1:
        raise ValueError(f"vandermonde_mult: L must be >= 1, got L={L}")
    if v.dim() < 1 or v.shape != x.shape:
        raise ValueError(f"vandermonde_mult: v and x must have the same shape (..., N), got v {tuple(v.shape)} "
                         f"and x {tuple(x.shape)}")
    if v.shape[-1] < 1:
        raise ValueError(f"vandermonde_mult: N (last dim) must be >= 1, got v {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"vandermonde_mult: v and x must be on one device, got {v.device} and {x.device}")


def vandermonde_mult(v: torch.Tensor, x: torch.Tensor, L: int, *, backend: str = "auto") -> torch.Tensor:
    """out[..., l] = 2 Re sum_n v[..., n] exp(x[..., n] l), l = 0..L-1.

    v, x: complex64/complex128 (..., N), same shape; returns float32/float64 (..., L).
    backend: "auto" (Triton when it can run, else the chunked PyTorch path), "triton" (raises
    RuntimeError with the reason when it cannot run) or "torch" (the chunked PyTorch path).
    Differentiable w.r.t. v and x.
    """
    _check(v, x, L)
    which = choose_backend(backend, v, x)
    N = v.shape[-1]
    # Lazy conj views are resolved here: their conj bit got lost inside traced custom ops.
    v, x = v.resolve_conj(), x.resolve_conj()
    out = vandermonde_op(v.reshape(-1, N), x.reshape(-1, N), L, which)  # (R, L)
    return out.reshape(*v.shape[:-1], L)                                # (..., L)
