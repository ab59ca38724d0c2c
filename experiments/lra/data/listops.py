"""ListOps: the synthetic generator and an independent evaluator of the expressions (`docs/lra.md`).

A node is a leaf digit with probability 0.75 (always a leaf at depth 10); otherwise one of
MIN, MAX, MED (int of the median), SM (sum mod 10) applied to 2..10 arguments drawn uniformly.
Trees serialize as `[MAX 4 [MIN 2 7 ] 3 ]`; a tree's length counts operators, digits and closing
brackets. Only trees with `min_length < length < max_length` are kept, duplicates are dropped,
and everything is drawn from one `random.Random(seed)`, so a seed fixes the whole data set.

`generate_tree` computes the label while it builds the tree; `evaluate` re-derives it from the
string alone with a stack, so the two share no code (the tests compare them).
"""
from __future__ import annotations

import random
import statistics
from pathlib import Path

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LEAF_PROB = 0.75
MAX_DEPTH = 10
MIN_ARGS, MAX_ARGS = 2, 10
HEADER = "Source\tTarget"
SPLIT_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
FOLDER = "listops-1000"


class _TooLong(Exception):
    """Raised inside generation as soon as a tree cannot satisfy the length limit."""


def _apply(op: str, values: list[int]) -> int:
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(statistics.median(values))
    return sum(values) % 10


def generate_tree(rng: random.Random, *, max_length: int | None = None) -> tuple[list[str], int]:
    """Draw one tree; return (tokens, value). Raises `_TooLong` once it exceeds `max_length` tokens."""
    tokens: list[str] = []

    def node(depth: int) -> int:
        if depth >= MAX_DEPTH or rng.random() < LEAF_PROB:
            digit = rng.randrange(10)
            tokens.append(str(digit))
            value = digit
        else:
            op = OPERATORS[rng.randrange(len(OPERATORS))]
            n_args = rng.randint(MIN_ARGS, MAX_ARGS)
            tokens.append(op)
            value = _apply(op, [node(depth + 1) for _ in range(n_args)])
            tokens.append("]")
        if max_length is not None and len(tokens) >= max_length:
            raise _TooLong
        return value

    value = node(1)
    return tokens, value


def generate(n: int, *, seed: int, min_length: int = 500, max_length: int = 2000,
             exclude: set[str] | None = None, progress=None) -> list[tuple[str, int]]:
    """`n` distinct (expression, label) pairs with `min_length < length < max_length` tokens.

    `exclude` holds expressions already used (they are skipped and the set is updated);
    `progress` is an optional callable invoked with 1 per accepted example (e.g. tqdm.update).
    """
    if min_length < 0 or max_length <= min_length + 1:
        raise ValueError(f"need 0 <= min_length < max_length - 1, got min_length={min_length}, "
                         f"max_length={max_length}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    rng = random.Random(seed)
    seen = set() if exclude is None else exclude
    out: list[tuple[str, int]] = []
    while len(out) < n:
        try:
            tokens, value = generate_tree(rng, max_length=max_length)
        except _TooLong:
            continue
        if len(tokens) <= min_length:
            continue
        expr = " ".join(tokens)
        if expr in seen:
            continue
        seen.add(expr)
        out.append((expr, value))
        if progress is not None:
            progress(1)
    return out


def generate_splits(n_train: int, n_val: int, n_test: int, *, seed: int, min_length: int = 500,
                    max_length: int = 2000, progress=None) -> dict[str, list[tuple[str, int]]]:
    """Disjoint train/val/test sets drawn from one seeded stream (split = position in the stream)."""
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    data = generate(n_train + n_val + n_test, seed=seed, min_length=min_length,
                    max_length=max_length, progress=progress)
    return {"train": data[:n_train], "val": data[n_train:n_train + n_val],
            "test": data[n_train + n_val:]}


def write_splits(out: str | Path, splits: dict[str, list[tuple[str, int]]]) -> Path:
    """Write `out/listops-1000/basic_{train,val,test}.tsv` (header `Source\\tTarget`); return the folder."""
    folder = Path(out) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(folder / SPLIT_FILES[split], "w", encoding="utf-8", newline="\n") as f:
            f.write(HEADER + "\n")
            for expr, label in rows:
                f.write(f"{expr}\t{label}\n")
    return folder


def evaluate(expression: str) -> int:
    """Value of a ListOps expression string, parsed with an explicit stack.

    Accepts both the `[MAX 4 5 ]` form and the original release's parenthesized form
    (`( ( [MAX 4 ) 5 ) ]`): parentheses carry no meaning and are ignored.
    """
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for tok in expression.split():
        if tok in ("(", ")"):
            continue
        if tok.startswith("["):
            if tok not in OPERATORS:
                raise ValueError(f"unknown operator {tok!r} in ListOps expression")
            stack.append((tok, []))
            continue
        if tok == "]":
            if not stack:
                raise ValueError("unbalanced ']' in ListOps expression")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"operator {op} has no arguments")
            args = sorted(args)
            if op == "[MIN":
                value = args[0]
            elif op == "[MAX":
                value = args[-1]
            elif op == "[MED":
                mid = len(args) // 2
                value = args[mid] if len(args) % 2 else (args[mid - 1] + args[mid]) // 2
            else:
                value = sum(args) % 10
        elif tok.isdigit() and len(tok) == 1:
            value = int(tok)
        else:
            raise ValueError(f"unknown token {tok!r} in ListOps expression")
        if stack:
            stack[-1][1].append(value)
        elif result is None:
            result = value
        else:
            raise ValueError("ListOps expression has more than one top-level value")
    if stack or result is None:
        raise ValueError("ListOps expression is incomplete (unclosed operator or empty)")
    return result
