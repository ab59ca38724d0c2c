"""Mamba-3 scan, SISO and MIMO: public function `mamba3_scan` (docs/mamba3.md).

`mamba3_scan` validates its arguments, picks SISO (B, C of shape (b, L, G, N)) or MIMO (rank r:
(b, L, r, G, N), with the up/down projections `mimo_x`, `mimo_z`, `mimo_o`) and runs the chunked
form of `reference.py` / `mimo.py`: the rotations and trapezoid weights as plain torch ops, the
scan core as the custom op `ssmkit::mamba3_scan_core` (`op.py`, with its own backward op), so
`torch.compile(fullgraph=True)` traces a model using it, forward and backward. The op's backends:
"triton", the generic Triton scan core of `kernels/ssd/triton_ssd.py` (rank r > 1 folded into it
as 2r tokens per step), and "torch", the chunked PyTorch path of `op.py`. `backend="auto"` picks
Triton for CUDA tensors and the chunked path for CPU tensors, also under the Triton interpreter
(`auto_interprets=False` in `kernels/_triton.py`: only an explicit "triton" interprets).

The rest of the package: `op.py` (the custom ops and their chunked PyTorch backend, forward and
explicit backward) and, all plain PyTorch, `reference.py` (SISO: `mamba3_ref`, the float64
ground truth; `mamba3_step` for decoding; `mamba3_chunked`; `Mamba3State`, `default_state`) and
`mimo.py` (the same three for rank r, and `default_state_mimo`).
"""
from __future__ import annotations

import functools

import torch

from kernels._triton import choose_backend
from kernels.mamba3.mimo import (
    default_state_mimo,
    mamba3_mimo_chunked,
    mamba3_mimo_ref,
    mamba3_mimo_step,
)
from kernels.mamba3.op import scan_core
from kernels.mamba3.reference import (
    Mamba3State,
    chunked_scan,
    default_state,
    mamba3_chunked,
    mamba3_ref,
    mamba3_step,
    rotate_pairs,
)

__all__ = ["Mamba3State", "chunked_scan", "default_state", "default_state_mimo", "mamba3_chunked",
           "mamba3_mimo_chunked", "mamba3_mimo_ref", "mamba3_mimo_step", "mamba3_ref", "mamba3_scan",
           "mamba3_step", "rotate_pairs"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_types(named: dict) -> None:
    for name, t in named.items():
        if t is None and name in ("x", "dt", "A", "B", "C", "lam", "theta"):
            raise TypeError(f"mamba3_scan: {name} is required")
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"mamba3_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"mamba3_scan: {name} must be a floating tensor {_DTYPES}, got {t.dtype}")
    devices = {t.device for t in named.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"mamba3_scan: all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_shapes(x, B, D, B_bias, C_bias, mimo_x, initial_state) -> None:
    if x.dim() != 4 or x.shape[1] < 1:
        raise ValueError(f"mamba3_scan: x must have shape (batch, seqlen >= 1, nheads, headdim), got {tuple(x.shape)}")
    H = x.shape[2]
    if B.dim() not in (4, 5):
        raise ValueError(f"mamba3_scan: B must have shape (b, L, G, N) (SISO) or (b, L, r, G, N) (MIMO), "
                         f"got {tuple(B.shape)}")
    mimo = B.dim() == 5
    if mimo and mimo_x is None:
        raise ValueError(f"mamba3_scan: MIMO B {tuple(B.shape)} needs mimo_x of shape (H, r, P)")
    if not mimo and mimo_x is not None:
        raise ValueError(f"mamba3_scan: mimo_x is given but B {tuple(B.shape)} is SISO (b, L, G, N); "
                         "MIMO takes B, C of shape (b, L, r, G, N)")
    if D is not None and tuple(D.shape) != (H,):
        raise ValueError(f"mamba3_scan: D must have shape ({H},), got {tuple(D.shape)}")
    if not mimo:
        for name, t in (("B_bias", B_bias), ("C_bias", C_bias)):
            if t is not None and tuple(t.shape) != (H, B.shape[-1]):
                raise ValueError(f"mamba3_scan: {name} must have shape (H, N) = {(H, B.shape[-1])}, got {tuple(t.shape)}")
    if initial_state is not None and not (isinstance(initial_state, tuple) and len(initial_state) == 4
                                          and all(isinstance(s, torch.Tensor) for s in initial_state)):
        raise TypeError("mamba3_scan: initial_state must be a Mamba3State (angle, ssm, B_prev, x_prev) of tensors, "
                        f"got {type(initial_state).__name__}")


def mamba3_scan(x, dt, A, B, C, lam, theta, *, D=None, z=None, B_bias=None, C_bias=None, mimo_x=None,
                mimo_z=None, mimo_o=None, initial_state=None, seq_idx=None, chunk_size: int = 64,
                return_final_state=False, half: bool | None = None, backend: str = "auto"):
    """The Mamba-3 scan. x, z (b, L, H, P); dt > 0, A <= 0, lam in [0, 1] (b, L, H); theta (b, L, H, S)
    rotation rates; D (H,).

    SISO: B, C (b, L, G, N), B_bias, C_bias (H, N). MIMO of rank r: B, C (b, L, r, G, N),
    B_bias, C_bias (H, r, N), mimo_x (required), mimo_z (with z), mimo_o (H, r, P); without
    mimo_o the output keeps the r copies, (b, L, H, r, P).
    half: rotate the pairs (i, N/2 + i) instead of (2i, 2i+1); None: False for SISO, True for
    MIMO (the layouts of the public kernels).
    seq_idx (b, L) int, non-decreasing: packed documents; where it changes the state, the angle and
    the previous-token term restart from zero (initial_state feeds each row's first document).
    Computed in float32 (float64 for float64 x); y is returned in x's dtype and, with
    `return_final_state`, also the `Mamba3State` after the last token (for `mamba3_step` /
    `mamba3_mimo_step` or a next call). Differentiable in every floating input.
    backend: "auto" (Triton for CUDA tensors, else the chunked PyTorch path), "triton" or "torch"
    (`kernels/_triton.py`); the result does not depend on it, nor on chunk_size (up to rounding).
    """
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "lam": lam, "theta": theta, "D": D, "z": z,
             "B_bias": B_bias, "C_bias": C_bias, "mimo_x": mimo_x, "mimo_z": mimo_z, "mimo_o": mimo_o}
    _check_types(named)
    _check_shapes(x, B, D, B_bias, C_bias, mimo_x, initial_state)
    if seq_idx is not None and (not isinstance(seq_idx, torch.Tensor) or seq_idx.shape != x.shape[:2]
                                or seq_idx.is_floating_point() or seq_idx.is_complex()):
        raise ValueError(f"mamba3_scan: seq_idx must be an integer tensor of shape (b, L) = {tuple(x.shape[:2])}, "
                         f"got {getattr(seq_idx, 'shape', type(seq_idx).__name__)}")
    which = choose_backend(backend, *(t for t in named.values() if t is not None), auto_interprets=False)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    args = {k: None if v is None else v.to(ct) for k, v in named.items()}
    init = None if initial_state is None else Mamba3State(*(s.to(ct) for s in initial_state))
    mimo = B.dim() == 5
    half = mimo if half is None else half
    core = functools.partial(scan_core, backend=which)
    if mimo:
        y, final = mamba3_mimo_chunked(**args, initial_state=init, chunk_size=chunk_size,
                                       seq_idx=seq_idx, half=half, core=core)
    else:
        if half:
            raise ValueError("mamba3_scan: half=True (half-split rotation pairs) is implemented for MIMO only")
        y, final = mamba3_chunked(**{k: v for k, v in args.items() if not k.startswith("mimo")},
                                  initial_state=init, chunk_size=chunk_size, seq_idx=seq_idx, core=core)
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y
