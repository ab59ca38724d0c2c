"""The Cauchy product: public function `cauchy_mult` (`docs/operators.md`, "Cauchy operator").

    out[..., j] = sum_n v[..., n] / (z[j] - w[..., n])   (+ conj(v) / (z[j] - conj(w)) if symmetric)

`v` may carry extra leading dims beyond `w`'s: numerators that share one set of poles (S4's
k00, k01, k10, k11), computed in one pass. `cauchy_mult` validates, resolves the backend, reshapes
to the canonical shapes v (R, H, N), z (M,), w (H, N) and calls the `ssmkit::cauchy` custom op
(`op.py`), which runs the Triton launchers (`triton_cauchy.py`) or the chunked path
(`reference.py`), so `torch.compile(fullgraph=True)` traces a model that uses this function.
"""
from __future__ import annotations

import torch

from kernels._triton import choose_backend
from kernels.cauchy.op import cauchy_op
from kernels.cauchy.reference import cauchy_ref

__all__ = ["cauchy_mult", "cauchy_ref"]

_DTYPES = (torch.complex64, torch.complex128)


def _check(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, symmetric: bool) -> None:
    if not isinstance(symmetric, bool):
        raise TypeError(f"cauchy_mult: symmetric must be a bool, got {type(symmetric).__name__}")
    for name, t in (("v", v), ("z", z), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cauchy_mult: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"cauchy_mult: {name} must be complex64 or complex128, got {t.dtype}")
    if not v.dtype == z.dtype == w.dtype:
        raise TypeError(f"cauchy_mult: v, z, w must share one dtype, got {v.dtype}, {z.dtype}, {w.dtype}")
    if z.dim() != 1:
        raise ValueError(f"cauchy_mult: z must have shape (M,), got {tuple(z.shape)}")
    if w.dim() < 1:
        raise ValueError(f"cauchy_mult: w must have shape (..., N), got {tuple(w.shape)}")
    if v.dim() < w.dim() or v.shape[v.dim() - w.dim():] != w.shape:
        raise ValueError(f"cauchy_mult: v must have shape (*extra, *w.shape) = (..., {', '.join(map(str, w.shape))}), "
                         f"got v {tuple(v.shape)} and w {tuple(w.shape)}")


def cauchy_mult(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, *, symmetric: bool = False,
                backend: str = "auto") -> torch.Tensor:
    """Cauchy product: v (*R, *H, N), z (M,), w (*H, N), complex -> complex (*R, *H, M).

    v, z, w share one dtype (complex64 or complex128), which the output keeps. Differentiable
    w.r.t. v, z and w. `backend`: "auto" (Triton when it can run, else the chunked PyTorch path),
    "triton" (raises when it cannot run) or "torch" (the chunked path; memory O(R*H*M) plus a
    fixed-size tile, never (H, N, M)). Poles must not coincide with evaluation points.
    """
    _check(v, z, w, symmetric)
    which = choose_backend(backend, v, z, w)
    N, M = w.shape[-1], z.shape[0]
    rows = w.shape[:-1]
    extra = v.shape[:v.dim() - w.dim()]
    H, R = rows.numel(), extra.numel()
    if R * H * M == 0:
        # Nothing to launch; keep the graph connected so that gradients come back as zeros.
        return (v.sum() * 0 + z.sum() * 0 + w.sum() * 0).expand(*extra, *rows, M).clone()
    # Lazy conj views are resolved here: their conj bit got lost inside traced custom ops.
    v, z, w = v.resolve_conj(), z.resolve_conj(), w.resolve_conj()
    out = cauchy_op(v.reshape(R, H, N), z, w.reshape(H, N), symmetric, which)  # (R, H, M)
    return out.reshape(*extra, *rows, M)                                       # (*R, *H, M)
