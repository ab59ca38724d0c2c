"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for ssmkit models, SSM parameters kept in float32.

`fully_shard_model(model, param_dtype=torch.bfloat16)` shards a model whose residual blocks sit
in `model.blocks` (`ssm.SequenceModel`) or `model.layers` (`ssm.interop.MambaLM`):

- inside each block, every child that holds SSM parameters (the sequence layer: its
  `param_kinds` tag A, B, C, P, dt or D) is one unit whose policy keeps its parameters in
  float32, so the filter, the discretization and the scan see float32 parameters (its input is
  cast to float32, its output back to `param_dtype`);
- each block is a unit computing in `param_dtype` (its norms and feed-forward), resharded
  after use; the root holds the rest (embedding, decoder).

Under `torch.autocast(dtype=torch.bfloat16)` the layer's matrix products still run in bfloat16;
its parameters are stored, gathered and updated in float32. Gradients are reduced in
`reduce_dtype` (float32 by default). The layer is one unit rather than its SSM alone because the
layers reach some submodules' weights directly (`F.conv1d(u, conv.weight)`), which FSDP only
gathers for the unit whose `forward` runs.

Parameter kinds are stored on the modules by name (`ssm.layers.params`), so `ssm.param_groups`
still finds them after sharding: build the optimizer after `fully_shard_model`.
"""
from __future__ import annotations

import torch
from torch import nn

# Kinds whose parameters stay in float32: the SSM itself (its C included: S4 computes the filter
# from A, B, C together) and the selective layers' dt and skip D.
FP32_KINDS = ("A", "B", "C", "P", "dt", "D")


def _holds_kinds(module: nn.Module, kinds: tuple[str, ...]) -> bool:
    return any(kind in kinds for m in module.modules() for kind in getattr(m, "param_kinds", {}).values())


def _blocks(model: nn.Module):
    for name in ("blocks", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"fully_shard_model needs the residual blocks in model.blocks or model.layers "
                     f"(an nn.ModuleList); {type(model).__name__} has neither")


def fully_shard_model(model: nn.Module, *, mesh=None, param_dtype: torch.dtype | None = None,
                      reduce_dtype: torch.dtype | None = torch.float32, fp32_kinds: tuple[str, ...] = FP32_KINDS,
                      reshard_after_forward: bool = True, root: nn.Module | None = None) -> nn.Module:
    """Apply `fully_shard` in place (and return the model): SSM layers, then blocks, then the root.

    mesh: a 1-D `DeviceMesh` (default: every rank of the default process group on the model's
    device type). param_dtype: compute dtype of the parameters outside the SSM layers (None: their
    own). fp32_kinds: parameter kinds whose layer keeps float32. root: the outermost module to
    shard last when `model` is a backbone inside a larger one (task heads around it); default `model`.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if param_dtype is not None and not isinstance(param_dtype, torch.dtype):
        raise TypeError(f"param_dtype must be a torch.dtype or None, got {param_dtype!r}")
    blocks = _blocks(model)
    if mesh is None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("fully_shard_model needs an initialized process group (torchrun, or "
                               "dist.init_process_group) or an explicit mesh=")
        mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    compute = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # The SSM layer takes its input in float32 and hands its output back in the blocks' dtype.
    keep = MixedPrecisionPolicy(param_dtype=None if param_dtype is None else torch.float32, reduce_dtype=reduce_dtype,
                                output_dtype=param_dtype)
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    for block in blocks:
        for child in block.children():
            if _holds_kinds(child, fp32_kinds):
                fully_shard(child, mp_policy=keep, **kw)
        fully_shard(block, mp_policy=compute, **kw)
    fully_shard(model if root is None else root, mp_policy=compute, **kw)
    return model
