"""One LRA run's state and how it is built: runtime (rank, device), data splits, model, optimizer,
schedule and loader (`build`), the memory check, and the start of a fresh or resumed run.

`experiments.lra.train` is the command line; the loop is `experiments.lra.loop`, evaluation and the
final report `experiments.lra.evaluate`, checkpoints `experiments.lra.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from experiments.lra import checkpoint as ckpt_io
from experiments.lra.config import Config, sequence_length
from experiments.lra.models import build_model, make_optimizer
from experiments.lra.schedules import lr_multiplier
from experiments.lra.tasks import Task, task_info


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, one shard per rank) that can start mid-epoch."""

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


class ShardSampler(Sampler):
    """Every `num_replicas`-th index from `rank`, in order: evaluation sees each item exactly once."""

    def __init__(self, n: int, *, num_replicas: int, rank: int):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Runtime:
    """Where this process runs: rank and world size (torchrun), device, bf16 autocast."""

    rank: int
    world: int
    device: torch.device
    amp: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Trainer:
    """Everything one run holds while it trains; built by `build`."""

    cfg: Config
    rt: Runtime
    task: Task
    out: Path
    splits: dict
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: ResumableSampler
    train_loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    state: dict = field(default_factory=lambda: {
        "step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_acc": -1.0, "best_step": -1, "val_step": -1,
        "seconds": 0.0, "tokens": 0, "slots": 0, "step_seconds": 0.0})
    tick: float = 0.0  # perf_counter at the last time accounted in state["seconds"]
    cpu_tick: float = 0.0  # process_time at the same moment, for state["cpu_seconds"]
    collate: Callable | None = None  # batches of evaluation splits (None: LRA's right-padding collate)
    tag: str = "lra"  # prefix of printed lines

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    def layout(self) -> dict:
        """What a resume must share with this run to continue it exactly."""
        bs = self.cfg.data.batch_size
        return {"world_size": self.rt.world, "batch_per_rank": bs, "global_batch": bs * self.rt.world,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}

    def log(self, **record) -> None:
        if self.rt.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.rt.main:
            print(f"[{self.tag}] {text}", flush=True)


def setup_device(cfg: Config) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(rank, world, device, amp=cfg.train.amp and device.type == "cuda")


def run_in_process(cfg, job: Callable[[], dict]) -> dict:
    """Run a training `job` with torch's thread count from `cfg.train.threads`, then restore it
    (callers in the same process keep their setting) and end the process group, if any."""
    threads = torch.get_num_threads()
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    try:
        return job()
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def load_splits(cfg: Config, data_dir: Path, rt: Runtime) -> dict:
    """Read the task's splits and refuse those too small for this run (naming their file)."""
    from experiments.lra.data import load_task

    splits = load_task(cfg.task, data_dir, max_len=cfg.data.max_len,
                       pathfinder_resolution=cfg.data.pathfinder_resolution)
    need = cfg.data.batch_size * rt.world
    if len(splits["train"]) < need:
        raise ValueError(f"LRA {cfg.task} train split has {len(splits['train'])} examples, fewer than one batch "
                         f"(data.batch_size={cfg.data.batch_size} x {rt.world} process(es) = {need}): "
                         f"{splits['train'].source}")
    for split in ("val", "test"):
        if len(splits[split]) < rt.world:
            raise ValueError(f"LRA {cfg.task} {split} split has {len(splits[split])} examples, fewer than the "
                             f"{rt.world} processes that share it: {splits[split].source}")
    return splits


def shard_model(model: torch.nn.Module, *, amp: bool) -> None:
    """FSDP2 over every rank: each residual block of the backbone one unit, its sequence layer a
    float32 unit inside it (bf16 compute elsewhere under autocast), the task heads in the root."""
    from ssm.distributed.fsdp import fully_shard_model

    backbones = [m for m in model.modules() if isinstance(getattr(m, "blocks", None), torch.nn.ModuleList)]
    if not backbones:
        raise ValueError(f"train.strategy=fsdp: {type(model).__name__} has no backbone with residual blocks")
    if len(backbones) > 1:
        raise ValueError(f"train.strategy=fsdp supports one backbone per model, found {len(backbones)}")
    fully_shard_model(backbones[0], param_dtype=torch.bfloat16 if amp else None, root=model)


def build(cfg: Config, rt: Runtime, splits: dict, out: Path) -> Trainer:
    """Model, optimizer, schedule and training loader, in the order that fixes the random streams."""
    from experiments.lra.data import collate

    task = task_info(cfg.task)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, device=rt.device)  # sizes from the task table and config.sequence_length
    o = cfg.optim
    ddp_model = model
    if rt.world > 1 and cfg.train.strategy == "fsdp":
        shard_model(model, amp=rt.amp)  # in place; the optimizer must see the sharded parameters
    elif rt.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg)
    sampler = ResumableSampler(splits["train"], num_replicas=rt.world, rank=rt.rank, seed=cfg.train.seed)
    # A private generator: building a DataLoader iterator must not draw from the global RNG, or a
    # resumed run's dropout masks would drift from the uninterrupted run's.
    train_loader = DataLoader(splits["train"], batch_size=cfg.data.batch_size, sampler=sampler,
                              collate_fn=train_collate(cfg, functools.partial(collate, pad_id=0), sequence_length(cfg)),
                              num_workers=cfg.data.num_workers,
                              generator=torch.Generator().manual_seed(cfg.train.seed))
    steps_per_epoch = math.ceil(sampler.num_samples / cfg.data.batch_size)
    total = max(cfg.train.epochs * steps_per_epoch, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_multiplier, o, total_steps=total))
    return Trainer(cfg, rt, task, out, splits, model, ddp_model, optimizer, scheduler, sampler, train_loader,
                   steps_per_epoch, total)



def train_collate(cfg, padded: Callable, longest: int) -> Callable:
    """The training batches' collate: `padded`, or packed rows (`experiments.lra.packing`) with
    `data.pack` (rows of `data.pack_len` tokens, or of `longest`, the longest example)."""
    if not getattr(cfg.data, "pack", False):
        return padded
    from experiments.lra.packing import pack_collate

    return functools.partial(pack_collate, pack_len=cfg.data.pack_len or longest, pad_id=0)


def check_memory(tr: Trainer, *, force: bool) -> None:
    """Estimate one step's peak memory; raise MemoryError (naming a batch size that fits) unless `force`.

    See `experiments.lra.memory` for how the estimate is made. Packed rows no longer than the
    longest example cost at most the padded batch; rows of `data.pack_len` are priced at that length
    and the most rows a batch can fill (`packing.max_rows`; a batch size named is then in rows).
    """
    from experiments.lra import memory

    # The longest sequence a batch can hold: the data's, within the configured length.
    n = min([sequence_length(tr.cfg)] + [getattr(ds, "longest", math.inf) for ds in tr.splits.values()])
    shape, rt, batch = ((2, n) if tr.task.two_tower else (n,)), tr.rt, tr.cfg.data.batch_size
    if tr.cfg.data.pack and tr.cfg.data.pack_len:  # longer rows, fewer of them
        from experiments.lra.packing import max_rows
        shape, batch = (tr.cfg.data.pack_len,), max_rows(batch, n, tr.cfg.data.pack_len)
    kwargs = dict(device=rt.device, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                  if rt.device.type == "cpu" else 1)
    try:
        est = memory.tensor_estimate(tr.model, seq_shape=shape, device=rt.device, amp=rt.amp)
    except Exception as e:  # an op without a fake-tensor rule: train without the estimate, but say so
        tr.say(f"memory estimate unavailable ({type(e).__name__}: {e}); starting without it")
        return
    if rt.device.type == "cuda":  # real steps are measured only when the tensor bytes say they fit
        line = memory.check_fits(est, batch=max(batch, 2), force=force, **kwargs)
        if "--force" not in line:
            est = memory.larger(est, memory.measured_estimate(tr.model, seq_shape=shape, device=rt.device,
                                                              amp=rt.amp))
    tr.say(memory.check_fits(est, batch=batch, force=force, **kwargs))


def start(tr: Trainer, ckpt: dict | None) -> None:
    """Load the checkpoint being resumed (or seed a fresh run) and write the run's header."""
    if ckpt is not None:
        ckpt_io.load_states(tr, ckpt, tr.last_path)
        tr.scheduler.load_state_dict(ckpt["scheduler"])
        tr.state.update(ckpt["state"])
        rng = ckpt["rng"]  # a list (one per rank) when saved by a distributed run
        ckpt_io.set_rng_state(rng[tr.rt.rank % len(rng)] if isinstance(rng, list) else rng)
        if tr.rt.main:  # what came after the checkpoint is redone: drop its records and the old result
            ckpt_io.trim_metrics(tr.out / "metrics.jsonl", tr.state["step"])
            (tr.out / "result.json").unlink(missing_ok=True)
        s = tr.state
        tr.say(f"resumed from step {s['step']} (epoch {s['epoch'] + 1}, batch {s['batch_in_epoch']} of "
               f"{tr.steps_per_epoch}) of {tr.last_path}")
    else:
        torch.manual_seed(tr.cfg.train.seed + tr.rt.rank)  # dropout streams differ across ranks
    if tr.rt.main:
        (tr.out / "config.json").write_text(json.dumps(tr.cfg.to_dict(), indent=2))
        n_params = sum(p.numel() for p in tr.model.parameters())
        cfg = tr.cfg
        tr.say(f"{cfg.task}/{cfg.model_name} preset={cfg.preset} params={n_params:,} device={tr.rt.device} "
               f"world={tr.rt.world} steps/epoch={tr.steps_per_epoch} epochs={cfg.train.epochs} -> {tr.out}")


def read_resume(cfg: Config, out: Path, rt: Runtime, resume: bool) -> dict | None:
    """The checkpoint to resume (config checked), None for a fresh run; refuses to overwrite a run."""
    last = out / "last.pt"
    if not last.exists():
        if resume and rt.main:
            print(f"--resume: no checkpoint at {last}; starting a new run", flush=True)
        return None
    if not resume:
        raise FileExistsError(f"{out} already holds a run (last.pt): pass --resume to continue it "
                              "or choose another --out")
    ckpt = torch.load(last, map_location=rt.device, weights_only=False)
    defaults = {name: dataclasses.asdict(type(getattr(cfg, name))()) for name in ("data", "model", "optim", "train")}
    ckpt_io.check_config(ckpt["config"], cfg.to_dict(), defaults=defaults)
    return ckpt
