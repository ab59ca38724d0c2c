"""Packed (variable-length) batches: several documents laid end to end in one row.

A packed batch is described either by `cu_seqlens` (the cumulative document lengths of one long
row, as the varlen attention kernels take them) or by `seq_idx` (B, L): the index of the document
each position belongs to, non-decreasing along L. Every layer takes `seq_idx`; at each position
where it changes, the recurrent state and the convolution state restart from zero and RoPE
positions restart from 0, so a packed row computes exactly what separate runs would.
"""
from __future__ import annotations

import torch


def check_seq_idx(seq_idx: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Validate `seq_idx` for an input of shape (batch, length, ...); returns it as int64."""
    if not isinstance(seq_idx, torch.Tensor):
        raise TypeError(f"seq_idx must be a tensor of shape ({batch}, {length}), got {type(seq_idx).__name__}")
    if seq_idx.shape != (batch, length):
        raise ValueError(f"seq_idx must have shape ({batch}, {length}) (batch, length), got {tuple(seq_idx.shape)}")
    if seq_idx.is_floating_point() or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
        raise TypeError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
    # Skipped while torch.compile traces (a data-dependent branch would break the graph); eager
    # calls, and the tests, check it.
    if length > 1 and not torch.compiler.is_compiling() and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        row = int((seq_idx[:, 1:] < seq_idx[:, :-1]).any(1).nonzero()[0])
        raise ValueError(f"seq_idx must be non-decreasing along the sequence; row {row} decreases")
    return seq_idx.long()


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """cu_seqlens (n_docs + 1,) = [0, l_0, l_0 + l_1, ...] -> seq_idx (1, total) for one packed row."""
    cu = torch.as_tensor(cu_seqlens)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu.shape)}")
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    total = int(cu[-1])
    if length is not None and total != length:
        raise ValueError(f"cu_seqlens[-1] = {total} must equal the sequence length {length}")
    lens = (cu[1:] - cu[:-1]).long()  # (n_docs,)
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens).unsqueeze(0)  # (1, total)


def doc_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True where a new document starts (position 0 and every change of `seq_idx`)."""
    start = torch.ones_like(seq_idx, dtype=torch.bool)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return start


def positions(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) int64: each position's offset from the start of its own document (RoPE positions)."""
    length = seq_idx.shape[1]
    ar = torch.arange(length, device=seq_idx.device).expand_as(seq_idx)  # (B, L)
    start_pos = torch.where(doc_starts(seq_idx), ar, torch.zeros_like(ar))
    return ar - torch.cummax(start_pos, dim=1).values  # (B, L)
