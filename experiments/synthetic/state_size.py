"""Bytes of state a model carries per sequence while it streams, read off its own state objects.

`model.default_state(batch_size)` returns a tree (lists, tuples, dicts) of tensors. Two kinds occur:

- fixed size: an SSM state, e.g. (B, H, N/2) complex64 for a diagonal S4D layer (N/2 conjugate
  pairs) or (B, H, N) complex64 for a DPLR S4 layer. It counts its bytes as is.
- growing: a tensor that starts with a zero-length axis is a cache that gains one entry along
  that axis per token. The attention KV cache is of this kind: raw keys and values
  (B, n_heads, T, head_dim) plus, per token, its position (B, T) int64 and a validity flag
  (B, T) bool. At `seq_len` tokens it counts `seq_len` entries.

So a Transformer layer of width d_model holds 2 * seq_len * d_model values of its parameter dtype
plus 9 bytes of bookkeeping per token, while an SSM layer holds the same bytes at any length.
How the synthetic tasks use this: `docs/synthetic.md`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from experiments.synthetic.common import check_int


@dataclass(frozen=True)
class StateEntry:
    """One tensor of a state tree: `path` (e.g. "[2]['k']"), its shape and dtype as returned by
    `default_state`, whether it grows with the sequence, and its bytes at the requested length."""

    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    grows: bool
    bytes: int


def _walk(tree, path: str = ""):
    """(path, tensor) for every tensor in a tree of lists, tuples and dicts."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _walk(value, f"{path}[{key!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _walk(value, f"{path}[{i}]")
    elif tree is not None:
        raise TypeError(f"state tree at {path or 'the root'} holds a {type(tree).__name__}, "
                        "expected tensors in lists, tuples or dicts")


def state_entries(model, batch_size: int = 1, seq_len: int | None = None) -> list[StateEntry]:
    """Every tensor of `model.default_state(batch_size)` with its bytes after `seq_len` tokens."""
    check_int("batch_size", batch_size, 1)
    if seq_len is not None:
        check_int("seq_len", seq_len, 0)
    if not callable(getattr(model, "default_state", None)):
        raise TypeError(f"model must have default_state(batch_size), got {type(model).__name__}")
    entries = []
    for path, t in _walk(model.default_state(batch_size)):
        empty = [d for d, n in enumerate(t.shape) if n == 0]
        if len(empty) > 1:
            raise ValueError(f"state tensor {path} of shape {tuple(t.shape)} has more than one empty axis: "
                             "cannot tell which one grows")
        grows = bool(empty)
        if grows and seq_len is None:
            raise ValueError(f"seq_len is needed: state tensor {path} of shape {tuple(t.shape)} is a cache "
                             "that grows with the sequence")
        per_entry = math.prod(n for d, n in enumerate(t.shape) if d not in empty) * t.element_size()
        entries.append(StateEntry(path, tuple(t.shape), t.dtype, grows, per_entry * (seq_len if grows else 1)))
    return entries


def state_bytes(model, batch_size: int = 1, seq_len: int | None = None) -> int:
    """Bytes of streaming state for `batch_size` sequences after `seq_len` tokens (per sequence
    with the default batch_size=1). `seq_len` is required when the model keeps a growing cache."""
    return sum(e.bytes for e in state_entries(model, batch_size, seq_len))
