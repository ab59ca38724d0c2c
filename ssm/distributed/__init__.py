"""Context parallelism: one long sequence split along L over the ranks of a process group.

    import torch.distributed as dist
    from ssm.distributed import context_parallel, shard_sequence, gather_sequence, reduce_gradients

    dist.init_process_group("nccl")                 # or "gloo"; one process per rank (torchrun)
    model = context_parallel(ssm.SequenceModel(..., pooling="none"))
    y, _ = model(shard_sequence(x))                 # this rank's positions only
    loss = loss_fn(y, shard_sequence(target)); loss.backward()
    reduce_gradients(model)                         # sum the ranks' parameter gradients

Every sequence layer (S4D, S4, Mamba-2, Mamba) exchanges only its boundary states with the other
ranks (docs/distributed.md); everything else in a `SequenceModel` (embedding, norms,
feed-forward, decoder) acts per position and runs on the shard as is. Attention, pooling over
the sequence, absolute positions and batch norm see the whole sequence and are refused.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ssm.distributed.comm import (
    all_gather_ints,
    padded_all_gather,
    rank_and_size,
    shard_sizes,
)
from ssm.distributed.layers import CONTEXT_PARALLEL

__all__ = ["context_parallel", "gather_sequence", "reduce_gradients", "remove_context_parallel",
           "shard_bounds", "shard_sequence", "shard_sizes"]


def shard_bounds(length: int, group=None) -> tuple[int, int]:
    """(start, stop) of this rank's contiguous shard of a sequence of `length` positions."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    rank, world = rank_and_size(group)
    if length < world:
        raise ValueError(f"length {length} must be at least the world size {world} (one position per rank)")
    sizes = shard_sizes(length, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def shard_sequence(x: torch.Tensor, group=None, *, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of x along `dim` (a view; gradients flow back to x)."""
    if not isinstance(x, torch.Tensor) or not -x.dim() <= dim < x.dim():
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor with a dim {dim} (the sequence dim), got {got}")
    start, stop = shard_bounds(x.shape[dim], group)
    return x.narrow(dim, start, stop - start)


def gather_sequence(y: torch.Tensor, group=None, *, dim: int = 1) -> torch.Tensor:
    """Every rank's shard of y along `dim`, concatenated in rank order, on every rank.

    Differentiable: the gradient reaching a rank's shard is the sum of the gradients every rank's
    loss puts on it. This moves the whole sequence; the layers themselves never do.
    """
    if not isinstance(y, torch.Tensor) or not -y.dim() <= dim < y.dim():
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a tensor with a dim {dim} (the sequence dim), got {got}")
    dim = dim % y.dim()
    sizes = all_gather_ints(y.shape[dim], group, y.device)
    return padded_all_gather(y, dim, sizes, group)


def _check_model(model: nn.Module) -> None:
    """Refuse the parts of a model that look across positions."""
    from ssm.layers.attention import MultiHeadAttention
    from ssm.layers.nn import MaskedNorm
    from ssm.models import SequenceModel
    for name, m in model.named_modules():
        where = f"{type(m).__name__} at {name or 'the top'!r}"
        if isinstance(m, MultiHeadAttention):
            raise ValueError(f"context parallelism supports state-space layers only; {where} is attention, "
                             "whose shards would need every earlier key and value (out of scope)")
        if isinstance(m, MaskedNorm) and m.kind == "batch":
            raise ValueError(f"{where} uses batch norm, whose statistics cover the whole sequence; use norm='layer'")
        if isinstance(m, SequenceModel):
            if m.pooling != "none":
                raise ValueError(f"{where} pools over the sequence (pooling={m.pooling!r}); use pooling='none' "
                                 "and pool the gathered or per-shard outputs yourself")
            if m.pos is not None:
                raise ValueError(f"{where} adds absolute positions (pos={m.pos_kind!r}); use pos='none'")


def context_parallel(model: nn.Module, group=None) -> nn.Module:
    """Make every S4 / S4D / Mamba / Mamba-2 layer in `model` run on shards over `group`, in place.

    Each layer's class becomes its context-parallel subclass (`ssm.distributed.layers`); the
    parameters, module names and `state_dict` keys are unchanged. Afterwards the model's forward
    takes this rank's shard (`shard_sequence`) and returns this rank's outputs; every rank must
    call forward and backward together. Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rank_and_size(group)
    _check_model(model)
    found = 0
    for m in model.modules():
        cls = CONTEXT_PARALLEL.get(type(m))
        if cls is not None:
            m.__class__ = cls
            found += 1
        if isinstance(m, tuple(CONTEXT_PARALLEL.values())):
            m.cp_group = group
    if not found and not any(isinstance(m, tuple(CONTEXT_PARALLEL.values())) for m in model.modules()):
        names = [c.__name__ for c in CONTEXT_PARALLEL]
        raise ValueError(f"model has no sequence layer to run in parallel (looked for {names})")
    return model


def remove_context_parallel(model: nn.Module) -> nn.Module:
    """Undo `context_parallel` in place: every layer takes whole sequences again. Returns `model`."""
    back = {v: k for k, v in CONTEXT_PARALLEL.items()}
    for m in model.modules():
        if type(m) in back:
            m.__dict__.pop("cp_group", None)
            m.__class__ = back[type(m)]
    return model


def reduce_gradients(model: nn.Module, group=None) -> None:
    """Sum every parameter's gradient over `group`: each rank holds its shard's share of it."""
    rank_and_size(group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
