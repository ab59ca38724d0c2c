"""ssmkit: state-space sequence layers (HiPPO, S4, S4D, Mamba, Mamba-2, Mamba-3), attention baselines, LRA tooling.

Public names are resolved lazily so `import ssm` stays cheap. Note: an unrelated distribution on
the package index also installs a top-level `ssm` package; this one comes from `ssmkit`.
`S4` and `S4Block` return `(y, state)`; wrap them in `SequenceOnly` to use them in `nn.Sequential`.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "S4": "ssm.layers.s4",
    "S4Block": "ssm.layers.block",
    "SequenceOnly": "ssm.layers.nn",
    "SequenceDropout": "ssm.layers.nn",
    "param_groups": "ssm.layers.params",
    "MultiHeadAttention": "ssm.layers.attention",
    "TransformerBlock": "ssm.layers.attention",
    "SequenceModel": "ssm.models",
    "SelectiveBlock": "ssm.layers.block",
    "Mamba": "ssm.layers.mamba",
    "Mamba2": "ssm.layers.mamba2",
    "Mamba3": "ssm.layers.mamba3",
    "MambaLM": "ssm.interop",
    "S4Config": "ssm.config",
    "AttentionConfig": "ssm.config",
    "BlockConfig": "ssm.config",
    "MambaConfig": "ssm.config",
    "Mamba2Config": "ssm.config",
    "Mamba3Config": "ssm.config",
}
_MODULES = ("approx", "config", "decode", "discretize", "distributed", "export", "fftconv", "filters", "hippo",
            "interop", "layers", "models", "packing")

__all__ = sorted(_EXPORTS) + list(_MODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"ssm.{name}")
    raise AttributeError(f"module 'ssm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
