"""ssmkit: state-space sequence layers (HiPPO, S4, S4D), attention baselines, LRA tooling.

Public names are resolved lazily so `import ssm` stays cheap. Note: an unrelated distribution on
the package index also installs a top-level `ssm` package; this one comes from `ssmkit`.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "S4": "ssm.layers.s4",
    "S4Block": "ssm.layers.block",
    "param_groups": "ssm.layers.params",
    "MultiHeadAttention": "ssm.layers.attention",
    "TransformerBlock": "ssm.layers.attention",
    "SequenceModel": "ssm.models",
}

__all__ = sorted(_EXPORTS) + ["hippo", "discretize", "approx", "models"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("hippo", "discretize", "approx", "models", "filters", "fftconv", "layers"):
        return importlib.import_module(f"ssm.{name}")
    raise AttributeError(f"module 'ssm' has no attribute {name!r}")
