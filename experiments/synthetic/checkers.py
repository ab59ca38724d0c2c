"""Independent checkers: each re-derives a task's targets from its input ids alone.

Plain Python loops over lists of ints that share no code with the generators (only the token
layout, which is the data format itself). A checker returns the targets it expects (a list, -100
where there is no label) and raises ValueError when the input breaks the task's layout, so a test
can compare them with the generator's targets and catch a malformed input as well.
"""
from __future__ import annotations

import itertools

NO_LABEL = -100


def _final_only(labels: list[int], mode: str) -> list[int]:
    if mode == "running":
        return labels
    return [NO_LABEL] * (len(labels) - 1) + labels[-1:]


def check_mqar(cfg, x: list[int]) -> list[int]:
    half, d = cfg.vocab_size // 2, cfg.num_kv_pairs
    if len(x) != cfg.seq_len:
        raise ValueError(f"mqar: length {len(x)} != seq_len {cfg.seq_len}")
    table = {}
    for j in range(d):
        key, value = x[2 * j], x[2 * j + 1]
        if not 1 <= key < half or not half <= value < cfg.vocab_size or key in table:
            raise ValueError(f"mqar: pair {j} ({key}, {value}) is not a fresh key with a value")
        if value in table.values():
            raise ValueError(f"mqar: value {value} is used twice")
        table[key] = value
    out = [NO_LABEL] * len(x)
    asked = []
    for t in range(2 * d, len(x)):
        if x[t] in table:
            if (t - 2 * d) % 2:
                raise ValueError(f"mqar: query at odd offset {t - 2 * d} of the query region")
            out[t] = table[x[t]]
            asked.append(x[t])
        elif not 0 <= x[t] < cfg.vocab_size or (not cfg.random_non_queries and x[t] != 0):
            raise ValueError(f"mqar: filler token {x[t]} at {t} is out of place")
    if sorted(asked) != sorted(table):
        raise ValueError("mqar: every key must be asked exactly once")
    return out


def check_selective_copy(cfg, x: list[int]) -> list[int]:
    blank, marker = 0, 1
    region = cfg.seq_len - cfg.n_tokens
    if len(x) != cfg.seq_len or any(tok != marker for tok in x[region:]):
        raise ValueError("selective_copy: the last n_tokens positions must all be the marker")
    data = []
    for tok in x[:region]:
        if tok == marker or not 0 <= tok < cfg.vocab_size:
            raise ValueError(f"selective_copy: token {tok} does not belong in the scattered region")
        if tok != blank:
            data.append(tok)
    if len(data) != cfg.n_tokens:
        raise ValueError(f"selective_copy: {len(data)} data tokens, expected {cfg.n_tokens}")
    return [NO_LABEL] * region + data


def check_induction(cfg, x: list[int]) -> list[int]:
    trigger = 0
    seen = [t for t, tok in enumerate(x) if tok == trigger]
    if len(x) != cfg.seq_len or len(seen) != 2 or seen[1] != len(x) - 1:
        raise ValueError(f"induction: the trigger must occur exactly twice, the second time last; at {seen}")
    if any(not 0 <= tok < cfg.vocab_size for tok in x):
        raise ValueError("induction: token out of the vocabulary")
    return [NO_LABEL] * (len(x) - 1) + [x[seen[0] + 1]]


def check_parity(cfg, x: list[int]) -> list[int]:
    labels, bit = [], 0
    for tok in x:
        if tok not in (0, 1):
            raise ValueError(f"parity: token {tok} is not a bit")
        bit = 1 - bit if tok == 1 else bit
        labels.append(bit)
    return _final_only(labels, cfg.mode)


def check_modadd(cfg, x: list[int]) -> list[int]:
    labels, total = [], 0
    for tok in x:
        if not 0 <= tok < cfg.modulus:
            raise ValueError(f"modadd: token {tok} is not a residue mod {cfg.modulus}")
        total += tok
        labels.append(total % cfg.modulus)
    return _final_only(labels, cfg.mode)


_PERMS = list(itertools.permutations(range(5)))  # lexicographic order
_NUMBER = {p: n for n, p in enumerate(_PERMS)}


def check_s5(cfg, x: list[int]) -> list[int]:
    labels, state = [], tuple(range(5))
    for tok in x:
        if not 0 <= tok < len(_PERMS):
            raise ValueError(f"s5: token {tok} is not a permutation number")
        p = _PERMS[tok]
        state = tuple(p[state[k]] for k in range(5))  # the new token acts after the ones before
        labels.append(_NUMBER[state])
    return _final_only(labels, cfg.mode)
