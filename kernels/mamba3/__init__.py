"""Mamba-3 (SISO) scan: the readable reference, the one-token step and a chunked PyTorch path.

The math: docs/mamba3.md. Everything lives in `reference.py` for now (no Triton kernel yet):
`mamba3_ref` (the definition, float64 ground truth), `mamba3_step` (decoding), `mamba3_chunked`
(no loop over time, autograd), `Mamba3State` and `default_state`.
"""
from kernels.mamba3.reference import (
                                      Mamba3State,
                                      chunked_scan,
                                      default_state,
                                      mamba3_chunked,
                                      mamba3_ref,
                                      mamba3_step,
                                      rotate_pairs,
)

__all__ = ["Mamba3State", "chunked_scan", "default_state", "mamba3_chunked", "mamba3_ref",
           "mamba3_step", "rotate_pairs"]
