"""Recall tasks: multi-query associative recall, selective copying, induction heads.

Each task is a frozen config (every knob checked when it is built: an impossible value is a
ValueError naming the knob) and a generator `generate(cfg, rng) -> (x (L,), y (L,))` of int64
arrays: input ids and targets, `IGNORE` (-100) where there is no label. Layouts and the reasons
behind them: `docs/synthetic.md`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from experiments.synthetic.common import IGNORE, check_int

COPY_BLANK, COPY_MARKER, COPY_FIRST_DATA = 0, 1, 2
INDUCTION_TRIGGER = 0


@dataclass(frozen=True)
class MQARConfig:
    """Multi-query associative recall.

    `num_kv_pairs` pairs `k v` (keys from 1..vocab_size//2 - 1, values from vocab_size//2..vocab_size-1,
    each distinct within a sample), then the rest of `seq_len`, where every key is asked once at an
    even offset `2 g` of the query region; the gaps `g` are drawn without replacement with
    P(g) proportional to (g + 1) ** (power_a - 1) (power_a = 1: uniform; small: queries near the
    pairs). The target at a query is its value. Other positions hold 0, or with
    `random_non_queries` a uniform token that is not one of the sample's keys.
    """

    vocab_size: int = 8192
    num_kv_pairs: int = 16
    seq_len: int = 256
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size, 4)
        check_int("num_kv_pairs", self.num_kv_pairs, 1)
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"num_kv_pairs={self.num_kv_pairs} needs more distinct keys than vocab_size="
                             f"{self.vocab_size} has (keys are 1..vocab_size//2 - 1: at most "
                             f"{self.vocab_size // 2 - 1}); raise vocab_size to >= {2 * self.num_kv_pairs + 2}")
        check_int("seq_len", self.seq_len, 4 * self.num_kv_pairs,
                  f"seq_len too short: the pairs take 2 * num_kv_pairs and the queries need "
                  f">= num_kv_pairs even slots after them, so seq_len >= 4 * num_kv_pairs")
        if isinstance(self.power_a, bool) or not isinstance(self.power_a, (int, float)) or not self.power_a > 0:
            raise ValueError(f"power_a must be a number > 0, got {self.power_a!r}")
        if not isinstance(self.random_non_queries, bool):
            raise ValueError(f"random_non_queries must be a bool, got {self.random_non_queries!r}")

    @property
    def n_classes(self) -> int:
        return self.vocab_size


def _not_keys(rng: np.random.Generator, keys: np.ndarray, vocab_size: int, size: int) -> np.ndarray:
    """`size` tokens uniform over 0..vocab_size-1 minus `keys` (distinct), without building that set."""
    r = rng.integers(0, vocab_size - keys.size, size)                  # (size,)
    shifted = np.sort(keys) - np.arange(keys.size)                     # (D,) non-decreasing
    # Every sorted key at or below the drawn rank pushes the token up by one.
    return r + np.searchsorted(shifted, r, side="right")               # (size,)


def generate_mqar(cfg: MQARConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    d, half, length = cfg.num_kv_pairs, cfg.vocab_size // 2, cfg.seq_len
    keys = 1 + rng.choice(half - 1, size=d, replace=False)             # (D,)
    values = half + rng.choice(cfg.vocab_size - half, size=d, replace=False)  # (D,)
    space = (length - 2 * d) // 2
    log_p = (cfg.power_a - 1.0) * np.log(np.arange(1, space + 1))     # (space,) unnormalized
    # Gumbel top-k: the ordered draw of d gaps without replacement, each next one with probability
    # proportional to p among those left (pair j gets the j-th gap drawn).
    gaps = np.argsort(-(log_p + rng.gumbel(size=space)), kind="stable")[:d]  # (D,)
    x = np.zeros(length, dtype=np.int64)                               # (L,)
    y = np.full(length, IGNORE, dtype=np.int64)                        # (L,)
    x[0:2 * d:2], x[1:2 * d:2] = keys, values
    where = 2 * d + 2 * gaps                                           # (D,)
    if cfg.random_non_queries:
        fill = np.ones(length, dtype=bool)
        fill[:2 * d] = False
        fill[where] = False
        x[fill] = _not_keys(rng, keys, cfg.vocab_size, int(fill.sum()))
    x[where], y[where] = keys, values
    return x, y


@dataclass(frozen=True)
class SelectiveCopyConfig:
    """Selective copying.

    The first `seq_len - n_tokens` positions are blanks (0) with `n_tokens` data tokens (uniform
    over 2..vocab_size-1) at random distinct positions; the last `n_tokens` positions hold the
    marker (1), and the target at the j-th marker is the j-th data token in order.
    """

    vocab_size: int = 16
    n_tokens: int = 16
    seq_len: int = 1024

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size, 3, "blank, marker and at least one data token")
        check_int("n_tokens", self.n_tokens, 1)
        check_int("seq_len", self.seq_len, 2 * self.n_tokens,
                  "seq_len too short: n_tokens scattered tokens plus n_tokens answer slots need "
                  "seq_len >= 2 * n_tokens")

    @property
    def n_classes(self) -> int:
        return self.vocab_size


def generate_selective_copy(cfg: SelectiveCopyConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n, region = cfg.n_tokens, cfg.seq_len - cfg.n_tokens
    tokens = rng.integers(COPY_FIRST_DATA, cfg.vocab_size, n)          # (n,)
    where = np.sort(rng.choice(region, size=n, replace=False))         # (n,)
    x = np.full(cfg.seq_len, COPY_BLANK, dtype=np.int64)               # (L,)
    y = np.full(cfg.seq_len, IGNORE, dtype=np.int64)                   # (L,)
    x[where] = tokens
    x[region:] = COPY_MARKER
    y[region:] = tokens
    return x, y


@dataclass(frozen=True)
class InductionConfig:
    """Induction heads.

    Uniform tokens from 1..vocab_size-1, except the trigger (0) at one random position p in
    0..seq_len-3 and again at the last position; the target at the last position is the token at
    p + 1. Train at one `seq_len` and test at longer ones (`experiments.synthetic.data.length_sweep`).
    """

    vocab_size: int = 16
    seq_len: int = 256

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size, 3, "the trigger plus at least two tokens to recall")
        check_int("seq_len", self.seq_len, 3, "trigger, the token after it, and the final trigger")

    @property
    def n_classes(self) -> int:
        return self.vocab_size


def generate_induction(cfg: InductionConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    length = cfg.seq_len
    x = rng.integers(INDUCTION_TRIGGER + 1, cfg.vocab_size, length)    # (L,)
    p = int(rng.integers(0, length - 2))
    x[p] = x[-1] = INDUCTION_TRIGGER
    y = np.full(length, IGNORE, dtype=np.int64)                        # (L,)
    y[-1] = x[p + 1]
    return x.astype(np.int64), y
