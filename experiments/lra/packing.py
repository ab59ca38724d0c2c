"""Packed training batches for the LRA and synthetic trainers (`--data.pack=true`), and the count of
real tokens per second that both trainers report.

A packed step trains on the same `data.batch_size` examples, in the same sampler order, as the
padded step it replaces (so the epoch length, the schedule and the resume position are unchanged),
but lays them end to end in rows of at most `data.pack_len` tokens (None: the longest example the
run can hold) instead of one padded row each. No example is ever split. Rows are filled first fit
by decreasing length (ties in sampler order) up to a capacity chosen per batch among the batch's
longest example and its doublings up to `pack_len`: the one that computes the fewest positions
(ties: the longer rows), so a packed batch never computes more than the padded one. All of it is
deterministic. The batch is as wide as its fullest row; the rest of a shorter row is one filler
document of pad tokens, which the model runs over but the loss never sees (its pooled output is
dropped; its per-position targets are -100). The model gets `seq_idx`, so no state crosses from
one example to the next (docs/packing.md).

Classification (one label per example): the model pools per document; `PackedBatch.keep` picks
each example's pooled logits, in batch order, so the loss and accuracy are the padded batch's.
Per-position targets (the synthetic tasks) are laid out like the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # target of positions without a label (cross_entropy's default ignore_index)


@dataclass
class PackedBatch:
    """What a packed batch adds to its tokens x (R, W): `seq_idx` (R, W) the document of every
    position; `keep` (n,) the pooled-output index of each example (None: per-position targets);
    `tokens` the number of real (non-filler) tokens."""

    seq_idx: torch.Tensor
    keep: torch.Tensor | None
    tokens: int

    def to(self, device) -> PackedBatch:
        keep = None if self.keep is None else self.keep.to(device)
        return PackedBatch(self.seq_idx.to(device), keep, self.tokens)


def fill_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` per row of `capacity` tokens: first fit, longest first (ties in the given order)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def choose_rows(lengths: list[int], pack_len: int) -> list[list[int]]:
    """The rows of the capacity, among the longest example and its doublings up to `pack_len`, that
    computes the fewest positions (rows x the fullest row; ties: the larger capacity, fewer rows). The longest
    example's capacity never computes more than the padded batch, so neither does the choice."""
    longest = max(lengths)
    if min(lengths) < 1 or longest > pack_len:
        raise ValueError(f"cannot pack examples of {min(lengths)} to {longest} tokens into rows of "
                         f"data.pack_len={pack_len} (an example is never split; each needs 1 to pack_len tokens)")
    best, capacity = None, longest
    while True:
        rows = fill_rows(lengths, capacity)
        cost = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best is None or cost <= best[0]:
            best = (cost, rows)
        if capacity >= pack_len:
            return best[1]
        capacity = min(2 * capacity, pack_len)


def pack_collate(batch, *, pack_len: int, pad_id: int = 0):
    """(ids (L_i,), label) items -> x (R, W) long, `PackedBatch`, y.

    y is the labels (n,) in batch order when labels are scalars, or the targets laid out like x
    (R, W) (-100 on filler) when each item carries per-position targets (L_i,)."""
    if not batch:
        raise ValueError("pack_collate got an empty batch")
    seqs = [torch.as_tensor(ids) for ids, _ in batch]
    if any(s.dim() != 1 for s in seqs):
        raise ValueError("packing needs one sequence per example (ids of shape (L,)); two-input items "
                         "(Retrieval) cannot be packed")
    per_position = torch.as_tensor(batch[0][1]).dim() > 0
    rows = choose_rows([s.numel() for s in seqs], pack_len)
    width = max(sum(seqs[i].numel() for i in row) for row in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)          # (R, W)
    seq_idx = torch.empty(len(rows), width, dtype=torch.long)            # (R, W)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long) if per_position else None  # (R, W)
    keep = torch.empty(len(seqs), dtype=torch.long)                      # (n,)
    doc = 0  # pooled-output index: documents are numbered row by row, filler included
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            n = seqs[i].numel()
            x[r, at:at + n] = seqs[i]
            seq_idx[r, at:at + n] = k
            if per_position:
                y[r, at:at + n] = torch.as_tensor(batch[i][1])
            keep[i] = doc
            doc, at = doc + 1, at + n
        seq_idx[r, at:] = len(row)  # the filler document (absent when the row is full)
        doc += at < width
    tokens = sum(s.numel() for s in seqs)
    if per_position:
        return x, PackedBatch(seq_idx, None, tokens), y
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.long)  # (n,)
    return x, PackedBatch(seq_idx, keep, tokens), labels


def logits_of(model, x: torch.Tensor, lengths) -> torch.Tensor:
    """The model's logits for a batch, aligned with its targets: `lengths` is the padded batch's
    (B,) lengths or a `PackedBatch`."""
    if not isinstance(lengths, PackedBatch):
        return model(x, lengths)
    out = model(x, seq_idx=lengths.seq_idx)
    return out if lengths.keep is None else out[lengths.keep]


def batch_tokens(x: torch.Tensor, lengths) -> tuple[int, int]:
    """(real tokens, positions the model computes) of a padded or packed batch."""
    real = lengths.tokens if isinstance(lengths, PackedBatch) else int(lengths.sum())
    return real, x.numel()


def max_rows(batch: int, longest: int, pack_len: int) -> int:
    """The most rows `batch` examples of at most `longest` tokens fill: first fit leaves at most
    one row at most half full, so R <= 2 * batch * longest / pack_len + 1 (and R <= batch)."""
    return min(batch, 2 * batch * longest // pack_len + 1)


def throughput(state: dict) -> dict:
    """Real tokens trained on, real tokens per second of step time (loading, packing, forward,
    backward, update; not validation or checkpoints) and the fraction of computed positions that
    were padding or filler, from a run's `state` counters (this process's batches)."""
    tokens, slots, secs = state.get("tokens", 0), state.get("slots", 0), state.get("step_seconds", 0.0)
    return {"train_tokens": tokens, "tokens_per_s": tokens / secs if secs > 0 else 0.0,
            "pad_frac": 1.0 - tokens / slots if slots else 0.0}


def pack_errors(pack, pack_len, longest: int) -> list[str]:
    """Checks of `data.pack` and `data.pack_len` shared by both trainers (`longest`: the longest
    example the run can hold)."""
    if not isinstance(pack, bool):
        return [f"--data.pack must be true or false, got {pack!r}"]
    if pack_len is None:
        return []
    if isinstance(pack_len, bool) or not isinstance(pack_len, int) or pack_len < 1:
        return [f"--data.pack_len must be an integer >= 1 or None, got {pack_len!r}"]
    if not pack:
        return [f"--data.pack_len={pack_len} needs --data.pack=true"]
    if pack_len < longest:
        return [(f"--data.pack_len={pack_len} must be at least the longest example ({longest} tokens): "
                 "an example is never split across rows")]
    return []


def lra_pack_errors(cfg, longest: int) -> list[str]:
    """Checks of packing for an LRA config: the shared ones, then what cannot take packed rows."""
    d, m = cfg.data, cfg.model
    errors = pack_errors(getattr(d, "pack", False), getattr(d, "pack_len", None), longest)
    if d.pack is not True:
        return errors
    why = "--data.pack=true"
    if cfg.task == "retrieval":
        errors.append(f"{why} is not available for retrieval (each example holds two documents)")
    if m.pooling == "cls":
        errors.append(f"{why} needs --model.pooling=mean or last (a packed row has no place for a CLS token)")
    if m.block.norm == "batch":
        errors.append(f"{why} needs --model.block.norm=layer (a batch norm's statistics would include the "
                      "filler at the end of the rows)")
    if cfg.model_name == "transformer" and m.pos in ("rope", "rope2d") and m.rope_scaling in ("dynamic", "longrope"):
        errors.append(f"{why} is not available with --model.rope_scaling={m.rope_scaling} (its frequencies "
                      "depend on each document's length)")
    return errors
