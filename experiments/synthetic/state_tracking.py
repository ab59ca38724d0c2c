"""State-tracking tasks: parity, addition modulo m, and composition of permutations in S_5.

Each is a running product in a finite group: Z_2, Z_m, S_5. The input is a uniform sequence of
group elements; the label at position t is the product of the elements 0..t. `mode="running"`
labels every position, `mode="final"` only the last (targets elsewhere are `IGNORE`).
Why these three separate kinds of recurrent state: `docs/synthetic.md`.

S_5: the 120 permutations of (0, 1, 2, 3, 4) are numbered in lexicographic order (0 is the
identity, 119 is (4, 3, 2, 1, 0)). Token a stands for the permutation p_a; the state after
tokens a_0..a_t is q_t = p_{a_t} o ... o p_{a_0}, i.e. q_t[k] = p_{a_t}[q_{t-1}[k]] (the first
token acts first), and the label is the number of q_t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from experiments.synthetic.common import MODES, check_choice, check_int, mode_targets

S5_ORDER = math.factorial(5)


def _check_mode(mode) -> None:
    check_choice("mode", mode, MODES)


@dataclass(frozen=True)
class ParityConfig:
    """Bits 0/1; label = XOR of the bits so far."""

    seq_len: int = 128
    mode: str = "running"

    def __post_init__(self):
        check_int("seq_len", self.seq_len, 1)
        _check_mode(self.mode)

    @property
    def vocab_size(self) -> int:
        return 2

    @property
    def n_classes(self) -> int:
        return 2


@dataclass(frozen=True)
class ModAddConfig:
    """Residues 0..modulus-1; label = their running sum modulo `modulus`."""

    modulus: int = 5
    seq_len: int = 128
    mode: str = "running"

    def __post_init__(self):
        check_int("modulus", self.modulus, 2)
        check_int("seq_len", self.seq_len, 1)
        _check_mode(self.mode)

    @property
    def vocab_size(self) -> int:
        return self.modulus

    @property
    def n_classes(self) -> int:
        return self.modulus


@dataclass(frozen=True)
class S5Config:
    """Permutation numbers 0..119; label = number of the composed permutation so far."""

    seq_len: int = 128
    mode: str = "running"

    def __post_init__(self):
        check_int("seq_len", self.seq_len, 1)
        _check_mode(self.mode)

    @property
    def vocab_size(self) -> int:
        return S5_ORDER

    @property
    def n_classes(self) -> int:
        return S5_ORDER


def generate_parity(cfg: ParityConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(0, 2, cfg.seq_len).astype(np.int64)               # (L,)
    return x, mode_targets(np.cumsum(x) % 2, cfg.mode)


def generate_modadd(cfg: ModAddConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(0, cfg.modulus, cfg.seq_len).astype(np.int64)     # (L,)
    return x, mode_targets(np.cumsum(x) % cfg.modulus, cfg.mode)


@lru_cache(maxsize=1)
def s5_permutations() -> np.ndarray:
    """(120, 5): row a is p_a, decoded from its factorial-base (Lehmer) digits."""
    a = np.arange(S5_ORDER)
    out = np.empty((S5_ORDER, 5), dtype=np.int64)
    left = np.tile(np.arange(5), (S5_ORDER, 1))                        # (120, 5) unused symbols, sorted
    for pos in range(5):
        digit = (a // math.factorial(4 - pos)) % (5 - pos)            # (120,)
        out[:, pos] = left[a, digit]
        left = np.stack([np.delete(row, d) for row, d in zip(left, digit)])  # (120, 4 - pos)
    return out


@lru_cache(maxsize=1)
def s5_table() -> list[list[int]]:
    """table[s][a] = number of p_a o p_s, as nested lists (fast scalar look-ups in the scan)."""
    perms = s5_permutations()                                          # (120, 5)
    composed = perms[np.arange(S5_ORDER)[None, :, None], perms[:, None, :]]  # (120 s, 120 a, 5)
    code = (composed * 5 ** np.arange(5)).sum(-1)                     # (120, 120) base-5 code
    number = np.full(5 ** 5, -1, dtype=np.int64)
    number[(perms * 5 ** np.arange(5)).sum(-1)] = np.arange(S5_ORDER)
    return number[code].tolist()


def generate_s5(cfg: S5Config, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(0, S5_ORDER, cfg.seq_len)                         # (L,)
    table, state, labels = s5_table(), 0, []
    for a in x.tolist():
        state = table[state][a]
        labels.append(state)
    return x.astype(np.int64), mode_targets(np.asarray(labels), cfg.mode)
