"""Train an LRA model: `python -m experiments.lra.train --task T --model M --data-dir DIR ...`.

AdamW over `ssm.layers.params.param_groups` (SSM parameters keep their own lr, no weight decay),
the learning-rate schedule of `config.lr_multiplier` (`optim.schedule`), optional gradient clipping
(`optim.grad_clip = 0`: none), bf16 autocast on CUDA. Before any
work the config is validated, the data is checked (no empty split, a full batch of training
examples, truncation reported) and one step's peak memory is estimated; a run that will not fit is
refused (`--force` starts it anyway). Only then is the run folder created.

Metrics stream to `RUN_DIR/metrics.jsonl`; `RUN_DIR/last.pt` is written atomically at every epoch
end, every `train.checkpoint_every` steps, at `--max-steps` and on SIGINT/SIGTERM, and `--resume`
continues from it exactly (model, optimizer, scheduler, RNG states and the position inside the
epoch's shuffled order; see `experiments.lra.checkpoint` for what is checked). The
best-validation checkpoint (`best.pt`) is evaluated on the test split at the end; the result goes
to `RUN_DIR/result.json`. Under `torchrun` (WORLD_SIZE > 1) it runs DistributedDataParallel with a
DistributedSampler (nccl on CUDA, gloo on CPU). Tasks, presets and settings: `docs/lra.md`.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from experiments.lra import checkpoint as ckpt_io
from experiments.lra import config as C
from experiments.lra.config import MODELS, PRESETS, TASKS, Config, apply_overrides, format_config, preset_config
from experiments.lra.config import split_overrides
from experiments.lra.models import build_model, make_optimizer
from experiments.lra.tasks import Task
from experiments.lra.tasks import task as task_facts


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


# --- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.lra.train",
        description="Train S4 / S4D / Transformer on a Long Range Arena task.",
        epilog="Any config field can be overridden as --section.field=value (sections: data, model, optim, "
               "train), e.g. --model.d_state=64 --optim.lr=3e-3. --print-config shows all fields.")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--data-dir", required=True, type=Path, help="root of the LRA data (release layout)")
    p.add_argument("--preset", default="cpu-small", choices=PRESETS)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/lra/TASK-MODEL-PRESET)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint) after N optimizer steps in total; the schedule is unchanged")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--force", action="store_true",
                   help="start even when the estimated peak memory exceeds the available memory")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    parser = build_parser()
    try:
        rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    try:
        cfg = apply_overrides(preset_config(args.task, args.model, args.preset), overrides)
    except (ValueError, TypeError) as e:
        parser.error(str(e))  # exits with status 2 and the usage line, like any bad argument
    if args.max_steps is not None:
        if args.max_steps < 0:
            parser.error(f"--max-steps must be >= 0, got {args.max_steps}")
        cfg.train.max_steps = args.max_steps
    if args.seed is not None:
        cfg.train.seed = args.seed
    try:
        validate_config(cfg)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.out is None:
        args.out = Path("runs") / "lra" / f"{args.task}-{args.model}-{args.preset}"
    return args, cfg


def validate_config(cfg: Config) -> None:
    """`config.validate` (ranges, divisibility, finite numbers) plus the trainer's own requirements."""
    C.validate(cfg)
    every = getattr(cfg.train, "checkpoint_every", None)
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"--train.checkpoint_every must be a positive number of steps or None, got {every!r}")


def lr_factor(step: int, *, optim, total: int) -> float:
    """The schedule's multiplier before optimizer step `step` (formulas: `config.lr_multiplier`)."""
    return C.lr_multiplier(optim, step, total)


# --- setup -------------------------------------------------------------------------------------

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
        "seconds": 0.0})
    tick: float = 0.0  # perf_counter at the last time accounted in state["seconds"]

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
            print(f"[lra] {text}", flush=True)


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


def build(cfg: Config, rt: Runtime, splits: dict, out: Path) -> Trainer:
    """Model, optimizer, schedule and training loader, in the order that fixes the random streams."""
    from experiments.lra.data import collate

    task = task_facts(cfg.task)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, device=rt.device)  # sizes from the task table and config.sequence_length
    o = cfg.optim
    optimizer = make_optimizer(model, cfg)
    ddp_model = model
    if rt.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    sampler = ResumableSampler(splits["train"], num_replicas=rt.world, rank=rt.rank, seed=cfg.train.seed)
    # A private generator: building a DataLoader iterator must not draw from the global RNG, or a
    # resumed run's dropout masks would drift from the uninterrupted run's.
    train_loader = DataLoader(splits["train"], batch_size=cfg.data.batch_size, sampler=sampler,
                              collate_fn=functools.partial(collate, pad_id=0), num_workers=cfg.data.num_workers,
                              generator=torch.Generator().manual_seed(cfg.train.seed))
    steps_per_epoch = math.ceil(sampler.num_samples / cfg.data.batch_size)
    total = max(cfg.train.epochs * steps_per_epoch, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, optim=o, total=total))
    return Trainer(cfg, rt, task, out, splits, model, ddp_model, optimizer, scheduler, sampler, train_loader,
                   steps_per_epoch, total)


def check_memory(tr: Trainer, *, force: bool) -> None:
    """Estimate one step's peak memory; raise MemoryError (naming a batch size that fits) unless `force`.

    See `experiments.lra.memory` for how the estimate is made.
    """
    from experiments.lra import memory

    # The longest sequence a batch can hold: the data's, within the configured length.
    n = min([C.sequence_length(tr.cfg)] + [getattr(ds, "longest", math.inf) for ds in tr.splits.values()])
    shape, rt = ((2, n) if tr.task.two_tower else (n,)), tr.rt
    kwargs = dict(device=rt.device, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                  if rt.device.type == "cpu" else 1)
    try:
        est = memory.tensor_estimate(tr.model, seq_shape=shape, device=rt.device, amp=rt.amp)
    except Exception as e:  # an op without a fake-tensor rule: train without the estimate, but say so
        tr.say(f"memory estimate unavailable ({type(e).__name__}: {e}); starting without it")
        return
    if rt.device.type == "cuda":  # real steps are measured only when the tensor bytes say they fit
        line = memory.check_fits(est, batch=max(tr.cfg.data.batch_size, 2), force=force, **kwargs)
        if "--force" not in line:
            est = memory.larger(est, memory.measured_estimate(tr.model, seq_shape=shape, device=rt.device,
                                                              amp=rt.amp))
    tr.say(memory.check_fits(est, batch=tr.cfg.data.batch_size, force=force, **kwargs))


def start(tr: Trainer, ckpt: dict | None) -> None:
    """Load the checkpoint being resumed (or seed a fresh run) and write the run's header."""
    if ckpt is not None:
        tr.model.load_state_dict(ckpt["model"])
        tr.optimizer.load_state_dict(ckpt["optimizer"])
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
    ckpt_io.check_config(ckpt["config"], cfg.to_dict())
    return ckpt


# --- checkpointing -----------------------------------------------------------------------------

def save(tr: Trainer, path: Path) -> None:
    """Write a checkpoint atomically (collective under torchrun: every rank's RNG state is gathered)."""
    rng = [None] * tr.rt.world if tr.rt.world > 1 else ckpt_io.rng_state()
    if tr.rt.world > 1:
        dist.all_gather_object(rng, ckpt_io.rng_state())
    if tr.rt.main:
        ckpt_io.write_atomic({"model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
                              "scheduler": tr.scheduler.state_dict(), "state": dict(tr.state), "rng": rng,
                              "layout": tr.layout(), "config": tr.cfg.to_dict()}, path)


# --- evaluation --------------------------------------------------------------------------------

def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model, loader, *, device, amp: bool, n_classes: int, world: int) -> dict:
    """Loss, accuracy, majority-class rate and mean real length over the loader (summed across ranks)."""
    model.eval()
    loss_sum, correct, count, len_sum = 0.0, 0.0, 0.0, 0.0
    hist = torch.zeros(n_classes, dtype=torch.float64)
    for x, lengths, y in loader:
        x, lengths, y = x.to(device), lengths.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x, lengths)  # (B, n_classes)
        logits = logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(-1) == y).sum())
        count += y.numel()
        len_sum += float(lengths.float().mean(-1).sum()) if lengths.dim() == 2 else float(lengths.sum())
        hist += torch.bincount(y.cpu(), minlength=n_classes).double()
    stats = _all_sum([loss_sum, correct, count, len_sum] + hist.tolist(), device, world)
    loss_sum, correct, count, len_sum, hist = stats[0], stats[1], stats[2], stats[3], stats[4:]
    if count == 0:
        raise ValueError("evaluation saw no examples")  # load_splits refuses empty splits before this
    return {"loss": loss_sum / count, "acc": correct / count, "n": int(count), "majority": max(hist) / count,
            "mean_len": len_sum / count}


def eval_split(tr: Trainer, split: str) -> dict:
    from experiments.lra.data import collate

    ds = tr.splits[split]
    loader = DataLoader(ds, batch_size=tr.cfg.data.eval_batch_size or tr.cfg.data.batch_size,
                        sampler=ShardSampler(len(ds), num_replicas=tr.rt.world, rank=tr.rt.rank),
                        collate_fn=functools.partial(collate, pad_id=0), num_workers=tr.cfg.data.num_workers,
                        generator=torch.Generator().manual_seed(0))
    return evaluate(tr.model, loader, device=tr.rt.device, amp=tr.rt.amp, n_classes=tr.task.n_classes,
                    world=tr.rt.world)


def validate(tr: Trainer) -> dict:
    """Validation at the current step: log it, keep `best.pt` up to date, print a line."""
    s = tr.state
    res = eval_split(tr, "val")
    s["val_step"] = s["step"]
    tr.log(split="val", step=s["step"], epoch=s["epoch"], loss=res["loss"], acc=res["acc"])
    if res["acc"] > s["best_val_acc"]:
        s["best_val_acc"], s["best_step"] = res["acc"], s["step"]
        save(tr, tr.best_path)
    tr.say(f"step {s['step']}: val acc {100 * res['acc']:.2f}% loss {res['loss']:.4f} "
           f"(best {100 * s['best_val_acc']:.2f}% at step {s['best_step']})")
    return res


# --- training loop -----------------------------------------------------------------------------

class Stopper:
    """SIGINT/SIGTERM and --max-steps, agreed across ranks; restores the signal handlers on exit."""

    def __init__(self, tr: Trainer):
        self.tr, self.signalled, self._old = tr, False, {}

    def __enter__(self) -> Stopper:
        if threading.current_thread() is threading.main_thread():  # signal handlers only install there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def __call__(self) -> bool:
        max_steps = self.tr.cfg.train.max_steps
        flag = self.signalled or (max_steps is not None and self.tr.state["step"] >= max_steps)
        if self.tr.rt.world > 1:
            t = torch.tensor([float(flag)], device=self.tr.rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


def train_step(tr: Trainer, x, lengths, y) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; returns (loss, logits)."""
    device, cfg = tr.rt.device, tr.cfg
    tr.ddp_model.train()
    x, lengths, y = x.to(device), lengths.to(device), y.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tr.rt.amp):
        logits = tr.ddp_model(x, lengths)  # (B, n_classes)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:  # 0 (or less) disables clipping
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.optim.grad_clip)
    tr.optimizer.step()
    tr.scheduler.step()
    return loss, logits


def _after_step(tr: Trainer, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
    """Bookkeeping of one step: counters, time, train log, periodic validation and checkpoint."""
    s, cfg = tr.state, tr.cfg
    s["step"] += 1
    s["batch_in_epoch"] += 1
    now = time.perf_counter()
    s["seconds"] += now - tr.tick
    tr.tick = now
    if s["step"] % cfg.train.log_every == 0 or s["step"] == 1:
        acc = float((logits.argmax(-1) == y.to(logits.device)).float().mean())
        tr.log(split="train", step=s["step"], epoch=s["epoch"], loss=loss.item(), acc=acc,
               lr=tr.scheduler.get_last_lr()[0], seconds=s["seconds"])
    if cfg.train.eval_every and s["step"] % cfg.train.eval_every == 0:
        validate(tr)
    every = getattr(cfg.train, "checkpoint_every", None)
    if every and s["step"] % every == 0:
        save(tr, tr.last_path)


def train_epoch(tr: Trainer, should_stop: Stopper) -> bool:
    """Train from the current position to the end of the epoch; True when stopped early."""
    from tqdm.auto import tqdm

    s, cfg = tr.state, tr.cfg
    tr.sampler.set_epoch(s["epoch"])
    tr.sampler.start = s["batch_in_epoch"] * cfg.data.batch_size
    bar = tqdm(total=tr.steps_per_epoch, initial=s["batch_in_epoch"], dynamic_ncols=True,
               desc=f"epoch {s['epoch'] + 1}/{cfg.train.epochs}", disable=not (cfg.train.progress and tr.rt.main))
    tr.tick = time.perf_counter()
    try:
        for x, lengths, y in tr.train_loader:
            loss, logits = train_step(tr, x, lengths, y)
            _after_step(tr, loss, logits, y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if should_stop():
                return True
        return False
    finally:
        bar.close()


def train_loop(tr: Trainer, should_stop: Stopper) -> bool:
    """All remaining epochs (validation and checkpoint at each end); True when stopped early."""
    s = tr.state
    stopped = should_stop()
    while not stopped and s["epoch"] < tr.cfg.train.epochs:
        stopped = train_epoch(tr, should_stop)
        if stopped:
            if not should_stop.signalled and s["val_step"] != s["step"]:
                validate(tr)  # --max-steps: validate the last weights before they are checkpointed
            save(tr, tr.last_path)
            why = "signal" if should_stop.signalled else f"--max-steps {tr.cfg.train.max_steps}"
            tr.say(f"stopped at step {s['step']} ({why}); checkpoint {tr.last_path}")
            break
        s["epoch"] += 1
        s["batch_in_epoch"] = 0
        if s["val_step"] != s["step"]:  # eval_every may have just validated these weights
            validate(tr)
        save(tr, tr.last_path)
    return stopped


# --- reporting ---------------------------------------------------------------------------------

def finish(tr: Trainer, stopped: bool) -> dict:
    """Test the best-validation checkpoint, write result.json and print the result line."""
    s, cfg, rt = tr.state, tr.cfg, tr.rt
    if s["val_step"] != s["step"]:
        validate(tr)  # e.g. --max-steps 0 on a fresh run: nothing validated yet
    if rt.world > 1:
        dist.barrier()
    best = torch.load(tr.best_path, map_location=rt.device, weights_only=False)
    tr.model.load_state_dict(best["model"])
    test = eval_split(tr, "test")
    tr.log(split="test", step=best["state"]["step"], loss=test["loss"], acc=test["acc"])
    result = {"task": cfg.task, "model": cfg.model_name, "preset": cfg.preset, "test_acc": test["acc"],
              "test_loss": test["loss"], "n_test": test["n"], "majority_rate": test["majority"],
              "test_mean_len": test["mean_len"],
              "best_val_acc": s["best_val_acc"], "best_step": s["best_step"], "steps": s["step"],
              "epochs_done": s["epoch"], "train_seconds": s["seconds"], "completed": not stopped,
              "n_params": sum(p.numel() for p in tr.model.parameters()), "config": cfg.to_dict()}
    if rt.main:
        (tr.out / "result.json").write_text(json.dumps(result, indent=2))
        print(f"\n[lra] TEST ACCURACY {cfg.task}/{cfg.model_name}: {100 * test['acc']:.2f}%  "
              f"(n={test['n']}, majority class {100 * test['majority']:.2f}%, best val "
              f"{100 * s['best_val_acc']:.2f}% at step {s['best_step']}) -> {tr.out / 'result.json'}", flush=True)
    return result


def run(cfg: Config, *, data_dir: Path, out: Path, resume: bool = False, force: bool = False) -> dict:
    """Train, evaluate the best-validation checkpoint on test, write result.json; returns the result.

    Everything that can refuse the run (config, checkpoint to resume, data, memory) happens before
    the run folder is created or touched.
    """
    validate_config(cfg)
    rt = setup_device(cfg)
    ckpt = read_resume(cfg, out, rt, resume)
    splits = load_splits(cfg, data_dir, rt)
    tr = build(cfg, rt, splits, out)
    if ckpt is not None:
        ckpt_io.check_layout(ckpt.get("layout"), tr.layout(), tr.last_path)
    check_memory(tr, force=force)
    out.mkdir(parents=True, exist_ok=True)
    start(tr, ckpt)
    with Stopper(tr) as should_stop:
        stopped = train_loop(tr, should_stop)
    if should_stop.signalled:
        if rt.world > 1:
            dist.barrier()
        return {"interrupted": True, "step": tr.state["step"]}
    return finish(tr, stopped)


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(argv)
    if args.print_config:
        print(format_config(cfg))
        return {}
    threads = torch.get_num_threads()
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    try:
        return run(cfg, data_dir=args.data_dir, out=args.out, resume=args.resume, force=args.force)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, MemoryError, ValueError) as err:  # no traceback for these
        sys.exit(f"error: {err}")
