"""Train an LRA model: `python -m experiments.lra.train --task T --model M --data-dir DIR ...`.

AdamW over `ssm.layers.params.param_groups` (SSM parameters keep their own lr, no weight decay),
linear warmup then cosine decay, gradient clipping, bf16 autocast on CUDA. Metrics stream to
`RUN_DIR/metrics.jsonl`; `RUN_DIR/last.pt` is written at every epoch end, at `--max-steps` and on
SIGINT/SIGTERM, and `--resume` continues from it exactly (model, optimizer, scheduler, RNG states and
the position inside the epoch's shuffled order). The best-validation checkpoint (`best.pt`) is
evaluated on the test split at the end; the result goes to `RUN_DIR/result.json`. Under `torchrun`
(WORLD_SIZE > 1) it runs DistributedDataParallel with a DistributedSampler (nccl on CUDA, gloo on
CPU). Settings: SPEC section 6, presets in `experiments.lra.config`.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from experiments.lra.config import (MODELS, PRESETS, TASKS, Config, apply_overrides, format_config,
                                    preset_config, split_overrides)
from experiments.lra.models import build_model

# Fields that may differ between a run and its --resume without changing the result.
_RESUME_FREE = {("train", "max_steps"), ("train", "progress"), ("train", "threads"), ("data", "num_workers")}


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
    if args.out is None:
        args.out = Path("runs") / "lra" / f"{args.task}-{args.model}-{args.preset}"
    return args, cfg


def lr_lambda(step: int, *, total: int, warmup: int, min_frac: float) -> float:
    """Multiplier of the base lr: linear warmup to 1, then cosine down to `min_frac`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    from ssm.layers.params import param_groups

    return param_groups(model, lr, weight_decay)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _setup_device(cfg: Config) -> tuple[int, int, torch.device]:
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
    return rank, world, device


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
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc": correct / count, "n": int(count), "majority": max(hist) / count,
            "mean_len": len_sum / count}


class _MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _check_resume_config(stored: dict, cfg: Config) -> None:
    now = cfg.to_dict()
    diffs = []
    for key in ("task", "model_name", "preset"):
        if stored[key] != now[key]:
            diffs.append(f"{key}: {stored[key]!r} -> {now[key]!r}")
    for section in ("data", "model", "optim", "train"):
        for name, value in now[section].items():
            if (section, name) not in _RESUME_FREE and stored[section].get(name) != value:
                diffs.append(f"{section}.{name}: {stored[section].get(name)!r} -> {value!r}")
    if diffs:
        raise ValueError("--resume with a different config than the checkpoint: " + "; ".join(diffs))


def run(cfg: Config, *, data_dir: Path, out: Path, resume: bool = False) -> dict:
    """Train, evaluate the best-validation checkpoint on test, write result.json; returns the result."""
    from experiments.lra.data import collate, load_task, task_info

    rank, world, device = _setup_device(cfg)
    main_proc = rank == 0
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.exists() and not resume:
        raise FileExistsError(f"{out} already holds a run (last.pt): pass --resume to continue it "
                              "or choose another --out")
    amp = cfg.train.amp and device.type == "cuda"

    info = task_info(cfg.task)
    splits = load_task(cfg.task, data_dir, max_len=cfg.data.max_len,
                       pathfinder_resolution=cfg.data.pathfinder_resolution)
    max_len = info.max_len
    if cfg.task in ("pathfinder", "pathx") and cfg.data.pathfinder_resolution is not None:
        max_len = cfg.data.pathfinder_resolution ** 2
    if cfg.data.max_len is not None:
        max_len = min(max_len, cfg.data.max_len)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, n_classes=info.n_classes, vocab_size=info.vocab_size, max_len=max_len,
                        dual=info.dual, device=device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.lr, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=info.dual)

    collate_fn = functools.partial(collate, pad_id=0)
    sampler = ResumableSampler(splits["train"], num_replicas=world, rank=rank, seed=cfg.train.seed)
    # A private generator: building a DataLoader iterator must not draw from the global RNG, or a
    # resumed run's dropout masks would drift from the uninterrupted run's.
    train_loader = DataLoader(splits["train"], batch_size=cfg.data.batch_size, sampler=sampler,
                              collate_fn=collate_fn, num_workers=cfg.data.num_workers,
                              generator=torch.Generator().manual_seed(cfg.train.seed))
    eval_bs = cfg.data.eval_batch_size or cfg.data.batch_size

    def eval_loader(split: str) -> DataLoader:
        ds = splits[split]
        return DataLoader(ds, batch_size=eval_bs, sampler=ShardSampler(len(ds), num_replicas=world, rank=rank),
                          collate_fn=collate_fn, num_workers=cfg.data.num_workers,
                          generator=torch.Generator().manual_seed(0))

    steps_per_epoch = math.ceil(sampler.num_samples / cfg.data.batch_size)
    total_steps = max(cfg.train.epochs * steps_per_epoch, 1)
    warmup = max(int(cfg.optim.warmup_frac * total_steps), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_lambda, total=total_steps, warmup=warmup, min_frac=cfg.optim.min_lr_frac))

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_acc": -1.0, "best_step": -1, "val_step": -1,
             "seconds": 0.0}
    if resume and last_path.exists():
        ckpt = torch.load(last_path, map_location=device, weights_only=False)
        _check_resume_config(ckpt["config"], cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state.update(ckpt["state"])
        rng = ckpt["rng"]  # a list (one per rank) when saved by a distributed run
        _set_rng_state(rng[rank % len(rng)] if isinstance(rng, list) else rng)
    else:
        if resume and main_proc:
            print(f"--resume: no checkpoint at {last_path}; starting a new run", flush=True)
        torch.manual_seed(cfg.train.seed + rank)  # dropout streams differ across ranks
    if main_proc:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[lra] {cfg.task}/{cfg.model_name} preset={cfg.preset} params={n_params:,} device={device} "
              f"world={world} steps/epoch={steps_per_epoch} epochs={cfg.train.epochs} -> {out}", flush=True)
    log = _MetricsLog(out / "metrics.jsonl", main_proc)

    def save(path: Path) -> None:
        rng = [None] * world if world > 1 else _rng_state()
        if world > 1:
            dist.all_gather_object(rng, _rng_state())
        if main_proc:
            tmp = path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "state": dict(state), "rng": rng,
                        "config": cfg.to_dict()}, tmp)
            os.replace(tmp, path)

    def validate() -> dict:
        res = evaluate(model, eval_loader("val"), device=device, amp=amp, n_classes=info.n_classes, world=world)
        state["val_step"] = state["step"]
        log.write(split="val", step=state["step"], epoch=state["epoch"], loss=res["loss"], acc=res["acc"])
        if res["acc"] > state["best_val_acc"]:
            state["best_val_acc"], state["best_step"] = res["acc"], state["step"]
            save(best_path)
        if main_proc:
            print(f"[lra] step {state['step']}: val acc {100 * res['acc']:.2f}% loss {res['loss']:.4f} "
                  f"(best {100 * state['best_val_acc']:.2f}% at step {state['best_step']})", flush=True)
        return res

    stop_signal = {"flag": False}

    def on_signal(signum, frame):
        stop_signal["flag"] = True

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers only install there
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, on_signal)

    def should_stop() -> bool:
        flag = stop_signal["flag"] or (cfg.train.max_steps is not None and state["step"] >= cfg.train.max_steps)
        if world > 1:
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    from tqdm.auto import tqdm

    stopped = should_stop()
    try:
        while not stopped and state["epoch"] < cfg.train.epochs:
            sampler.set_epoch(state["epoch"])
            sampler.start = state["batch_in_epoch"] * cfg.data.batch_size
            bar = tqdm(total=steps_per_epoch, initial=state["batch_in_epoch"], dynamic_ncols=True,
                       desc=f"epoch {state['epoch'] + 1}/{cfg.train.epochs}",
                       disable=not (cfg.train.progress and main_proc))
            t0 = time.perf_counter()
            for x, lengths, y in train_loader:
                ddp_model.train()
                x, lengths, y = x.to(device), lengths.to(device), y.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = ddp_model(x, lengths)  # (B, n_classes)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                state["batch_in_epoch"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if state["step"] % cfg.train.log_every == 0 or state["step"] == 1:
                    acc = float((logits.argmax(-1) == y).float().mean())
                    log.write(split="train", step=state["step"], epoch=state["epoch"], loss=loss.item(), acc=acc,
                              lr=scheduler.get_last_lr()[0],
                              seconds=state["seconds"] + time.perf_counter() - t0)
                if cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0:
                    validate()
                if should_stop():
                    stopped = True
                    break
            bar.close()
            state["seconds"] += time.perf_counter() - t0
            if stopped:
                save(last_path)
                if main_proc:
                    why = "signal" if stop_signal["flag"] else f"--max-steps {cfg.train.max_steps}"
                    print(f"[lra] stopped at step {state['step']} ({why}); checkpoint {last_path}", flush=True)
                break
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if state["val_step"] != state["step"]:  # eval_every may have just validated these weights
                validate()
            save(last_path)
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    if stop_signal["flag"]:
        if world > 1:
            dist.barrier()
        return {"interrupted": True, "step": state["step"]}
    if state["val_step"] != state["step"]:
        validate()  # a run cut short by --max-steps has no epoch-end validation of its last weights
    if world > 1:
        dist.barrier()
    best = torch.load(best_path, map_location=device, weights_only=False)
    model.load_state_dict(best["model"])
    test = evaluate(model, eval_loader("test"), device=device, amp=amp, n_classes=info.n_classes, world=world)
    log.write(split="test", step=best["state"]["step"], loss=test["loss"], acc=test["acc"])
    result = {"task": cfg.task, "model": cfg.model_name, "preset": cfg.preset, "test_acc": test["acc"],
              "test_loss": test["loss"], "n_test": test["n"], "majority_rate": test["majority"],
              "test_mean_len": test["mean_len"],
              "best_val_acc": state["best_val_acc"], "best_step": state["best_step"], "steps": state["step"],
              "epochs_done": state["epoch"], "train_seconds": state["seconds"], "completed": not stopped,
              "n_params": sum(p.numel() for p in model.parameters()), "config": cfg.to_dict()}
    if main_proc:
        (out / "result.json").write_text(json.dumps(result, indent=2))
        print(f"\n[lra] TEST ACCURACY {cfg.task}/{cfg.model_name}: {100 * test['acc']:.2f}%  "
              f"(n={test['n']}, majority class {100 * test['majority']:.2f}%, best val "
              f"{100 * state['best_val_acc']:.2f}% at step {state['best_step']}) -> {out / 'result.json'}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(argv)
    if args.print_config:
        print(format_config(cfg))
        return {}
    threads = torch.get_num_threads()
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    try:
        return run(cfg, data_dir=args.data_dir, out=args.out, resume=args.resume)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError) as err:  # missing data / occupied run folder: no traceback
        sys.exit(f"error: {err}")
