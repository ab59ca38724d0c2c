"""The collectives context parallelism uses: a differentiable all-gather of small tensors.

Everything a rank sends for one layer is packed into one flat real buffer and all-gathered, so
each layer costs one collective in the forward and one in the backward (the gradient of an
all-gather is an all-reduce of the stacked gradients, of which each rank keeps its own row).
The buffer holds boundary states and a few boundary inputs: its size does not depend on the
sequence length (docs/distributed.md, "Communication").
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_size(group=None) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context parallelism needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sizes(length: int, world: int) -> list[int]:
    """Contiguous shard lengths of a sequence of `length` over `world` ranks: the first
    `length % world` ranks take one position more."""
    base, extra = divmod(length, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


class _AllGather(torch.autograd.Function):
    """Flat real tensor t (n,) on every rank -> (world, n), row r from rank r.

    Backward: the loss is the sum of every rank's loss, so rank r's input gradient is the sum over
    ranks of their gradient for row r: one all-reduce of the (world, n) gradient.
    """

    @staticmethod
    def forward(ctx, t, group):
        rank, world = rank_and_size(group)
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.stack(parts)                                      # (world, n)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def all_gather_tensors(tensors: list[torch.Tensor], group=None) -> list[list[torch.Tensor]]:
    """Every rank's `tensors` (same shapes and dtypes on every rank), differentiably.

    Returns one list per rank, in rank order, each with this call's shapes and dtypes. Complex
    tensors travel as their real view; all travel in the widest real dtype among them.
    """
    wide = torch.float32
    for t in tensors:
        wide = torch.promote_types(wide, _real(t).dtype)
    flat = torch.cat([_real(t).reshape(-1).to(wide) for t in tensors])   # (n,)
    rows = _AllGather.apply(flat, group)                               # (world, n)
    sizes = [_real(t).numel() for t in tensors]
    out = []
    for row in rows.unbind(0):
        pieces = []
        for t, piece in zip(tensors, row.split(sizes)):
            shape = _real(t).shape
            piece = piece.reshape(shape).to(_real(t).dtype)
            pieces.append(torch.view_as_complex(piece.contiguous()) if t.is_complex() else piece)
        out.append(pieces)
    return out


def all_gather_ints(value: int, group=None, device=None) -> list[int]:
    """An int from every rank (no gradient), in rank order."""
    _, world = rank_and_size(group)
    t = torch.tensor([value], dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return [int(p) for p in parts]


def tie(tensors: list[torch.Tensor]) -> torch.Tensor:
    """An exact zero that depends on `tensors` (through empty slices).

    A rank that uses none of the gathered rows (rank 0 has no earlier shard) must still run the
    gather's backward, or the other ranks wait for it forever in their all-reduce.
    """
    return sum(_real(t).reshape(-1)[:0].sum() for t in tensors)


def padded_all_gather(x: torch.Tensor, dim: int, sizes: list[int], group=None) -> torch.Tensor:
    """Shards of different lengths along `dim` (this rank's is x) -> their concatenation, differentiably."""
    longest = max(sizes)
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    full = torch.cat([x, x.new_zeros(pad)], dim) if pad[dim] else x   # every shard padded to `longest`
    rows = _AllGather.apply(full.reshape(-1), group)                   # (world, n)
    shape = list(full.shape)
    parts = [row.reshape(shape).narrow(dim, 0, n) for row, n in zip(rows.unbind(0), sizes)]
    return torch.cat(parts, dim)
