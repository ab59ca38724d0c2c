"""ssm.distributed.fsdp: FSDP2 on 2 CPU processes (gloo) against DDP, and the float32 SSM policy."""
import copy
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ssm
from ssm.distributed.fsdp import fully_shard_model

WORLD = 2
SSM_LAYERS = ("S4", "Mamba2")
STEPS = 50  # the most any test trains


def _model(layer: str) -> torch.nn.Module:
    torch.manual_seed(0)
    # backend="torch": the suite runs with TRITON_INTERPRET=1, whose kernels would dominate the time.
    cfg = {"s4d": ssm.S4Config(mode="diag", d_state=8, backend="torch"),
           "s4": ssm.S4Config(mode="dplr", d_state=8, backend="torch"),
           "mamba2": ssm.Mamba2Config(d_state=8, headdim=8)}[layer]
    m = ssm.SequenceModel(5, vocab_size=16, d_model=8, n_layers=2, layer=layer, layer_config=cfg)
    m.set_l_max(16)
    return m


def _batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as a DistributedSampler gives
    xs = [torch.randint(1, 16, (2, 16), generator=g) for _ in range(STEPS)]
    return [(x, x[:, -1] % 5) for x in xs]  # a label the models can learn, so the curves fall


def _curves(rank: int, job: tuple, out: str) -> None:
    """Train the same model `steps` AdamW steps under DDP and under FSDP2; rank 0 saves both loss curves."""
    layers, steps = job
    got = {layer: _curves_one(rank, layer, steps) for layer in layers}
    if rank == 0:
        torch.save(got, out)


def _curves_one(rank: int, layer: str, steps: int) -> dict:
    ref = _model(layer)
    sharded = fully_shard_model(copy.deepcopy(ref))
    ddp = torch.nn.parallel.DistributedDataParallel(ref)
    opts = [torch.optim.AdamW(ssm.param_groups(m, 3e-3, 0.05)) for m in (ref, sharded)]
    losses = {"ddp": [], "fsdp": []}
    for x, y in _batches(rank)[:steps]:
        for key, model, opt in (("ddp", ddp, opts[0]), ("fsdp", sharded, opts[1])):
            loss = torch.nn.functional.cross_entropy(model(x)[0], y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[key].append(loss.item())
    return {"losses": losses, "lrs": sorted({g["lr"] for g in opts[1].param_groups})}


def _bf16_dtypes(rank: int, layers: list, out: str) -> None:
    """Under a bfloat16 policy, record the dtype each parameter has while its module runs."""
    got = {layer: _bf16_one(rank, layer) for layer in layers}
    if rank == 0:
        torch.save(got, out)


def _bf16_one(rank: int, layer: str) -> dict:
    model = fully_shard_model(_model(layer), param_dtype=torch.bfloat16)
    seen = {}

    def hook(module, args):
        # FSDP renames a sharded module's class to FSDP<name>; an SSM layer reports every parameter
        # below it (its SSM module is reached through methods, not through its own forward).
        name = type(module).__name__.removeprefix("FSDP")
        for pname, p in module.named_parameters(recurse=name in SSM_LAYERS):
            seen[f"{name}.{pname}"] = p.dtype

    for m in model.modules():
        m.register_forward_pre_hook(hook)
    x, y = _batches(rank)[0]
    torch.nn.functional.cross_entropy(model(x)[0].float(), y).backward()
    from ssm.layers.params import param_kinds

    kinds = param_kinds(model)
    return {"seen": seen, "stored": {kinds.get(id(p), "other"): p.dtype for p in model.parameters()}}


def _worker(rank: int, fn, layers: list, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        fn(rank, layers, out)
    finally:
        dist.destroy_process_group()


def _spawn(fn, layers, tmp_path) -> dict:
    """Run `fn` on WORLD forked gloo processes (forked: a spawned child re-imports torch, which
    costs far more than these tests' work); rank 0's result."""
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("the workers are forked (no fork start method on this platform)")
    _model("mamba2")  # import the lazily imported modules once, before forking
    out = str(tmp_path / "out.pt")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_worker, args=(fn, layers, init, out), nprocs=WORLD, join=True, start_method="fork")
    return torch.load(out)


@pytest.mark.parametrize("layers, steps", [(["s4d"], 50), pytest.param(["s4", "mamba2"], 50, marks=pytest.mark.slow)])
def test_fsdp_loss_curve_equals_ddp(layers, steps, tmp_path):
    """50 AdamW steps: S4D by default, S4 and Mamba-2 in the slow set."""
    curves = _spawn(_curves, (layers, steps), tmp_path)
    for layer in layers:
        got = curves[layer]
        ddp, fsdp = torch.tensor(got["losses"]["ddp"]), torch.tensor(got["losses"]["fsdp"])
        assert len(fsdp) == steps
        assert ddp[-10:].mean() < ddp[:10].mean(), layer  # it trained
        torch.testing.assert_close(fsdp, ddp, rtol=1e-5, atol=1e-6, msg=lambda m: f"{layer}: {m}")
        assert 1e-3 in got["lrs"] and 3e-3 in got["lrs"], layer  # the SSM group kept its own rate


@pytest.mark.parametrize("layer", ["s4d", "mamba2"])
def test_ssm_parameters_stay_float32_under_a_bfloat16_policy(layer, tmp_path):
    got = _spawn(_bf16_dtypes, [layer], tmp_path)[layer]
    ssm_seen = {k: v for k, v in got["seen"].items() if k.split(".")[0] in SSM_LAYERS}
    assert len(ssm_seen) >= 4 and all(v == torch.float32 for v in ssm_seen.values()), ssm_seen
    others = {k: v for k, v in got["seen"].items() if k.startswith(("Embedding", "LayerNorm", "Linear"))
              and k not in ssm_seen}
    assert any(v == torch.bfloat16 for v in others.values()), others  # the rest computes in bfloat16
    assert all(v == torch.float32 for v in got["stored"].values())    # stored (sharded) in float32


def test_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="model.blocks or model.layers"):
        fully_shard_model(torch.nn.Linear(2, 2))
