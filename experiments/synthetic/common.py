"""Shared pieces of the synthetic tasks: the ignore label, knob checks, the per-sample generator.

Sample `i` of split `split` is drawn from its own generator `np.random.default_rng([seed, s, i])`
(`s` = the split's index in `SPLITS`), so it is a pure function of (seed, split, i): it does not
depend on batch size, worker count or the order samples are asked for (`docs/synthetic.md`).
"""
from __future__ import annotations

import numpy as np

IGNORE = -100  # target at positions without a label (the default ignore_index of cross_entropy)
SPLITS = ("train", "val", "test")
MODES = ("running", "final")


def check_int(name: str, value, lo: int, why: str = "") -> None:
    """ValueError naming the knob unless `value` is an int >= lo (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} must be an int >= {lo}{extra}, got {value!r}")


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample `index` of `split`."""
    check_int("seed", seed, 0)
    check_choice("split", split, SPLITS)
    check_int("index", index, 0)
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def mode_targets(labels: np.ndarray, mode: str) -> np.ndarray:
    """Per-position labels (L,) as targets: all of them ("running") or only the last ("final")."""
    if mode == "running":
        return labels.astype(np.int64)                                 # (L,)
    out = np.full(labels.shape, IGNORE, dtype=np.int64)                # (L,)
    out[-1] = labels[-1]
    return out
