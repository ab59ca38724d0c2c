"""Checkpoints of an LRA run: atomic writes, what a checkpoint records, and the checks on resume.

A checkpoint holds the model, optimizer and scheduler states, every random number state (one per
rank), the training position (`state`: step, epoch, batch inside the epoch, best validation so far)
and the run's `layout`: world size, per-rank and global batch, steps per epoch and the schedule's
total steps. Resuming continues that exact run: the config (except fields that do not change the
result) and the layout must match, otherwise the resume is refused with a message naming what
differs. A different world size would change the data shards, the per-rank batch-norm statistics and
dropout streams, and (for a different global batch) the schedule, so it is refused rather than
approximated.

Under `train.strategy=fsdp` the model and optimizer are sharded over the ranks: their states go to
a `torch.distributed.checkpoint` folder next to the file (`last-step00000120.dcp/` beside `last.pt`),
each rank writing its own shards, and the file records the folder's name in place of the two states.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# Fields that may differ between a run and its --resume without changing the result.
RESUME_FREE = {("train", "max_steps"), ("train", "progress"), ("train", "threads"), ("data", "num_workers"),
               ("train", "checkpoint_every")}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file next to `path`, then rename it over `path` (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_config(stored: dict, now: dict, defaults: dict | None = None) -> None:
    """Refuse a resume whose config differs from the checkpoint's in a field that changes the run.

    defaults: the config's default values, same layout; a field that a checkpoint written by an
    earlier version lacks counts as having its default (a field added later must default to the
    behaviour before it existed)."""
    diffs = [f"{key}: {stored[key]!r} -> {now[key]!r}" for key in ("task", "model_name", "preset")
             if stored[key] != now[key]]
    missing = object()
    for section in ("data", "model", "optim", "train"):
        for name, value in now[section].items():
            old = stored[section].get(name, missing)
            if old is missing and defaults is not None:
                old = defaults[section].get(name, missing)
            if (section, name) not in RESUME_FREE and old != value:
                diffs.append(f"{section}.{name}: {'(absent)' if old is missing else repr(old)} -> {value!r}")
    if diffs:
        raise ValueError("--resume with a different config than the checkpoint: " + "; ".join(diffs))


def check_layout(stored: dict | None, now: dict, path: Path) -> None:
    """Refuse a resume under another world size / batch / schedule length than the checkpoint's."""
    if stored is None:
        raise ValueError(f"{path} records no world size or batch layout (written by an older version); "
                         "it cannot be resumed exactly. Start a new run in another --out")
    diffs = [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in now.items() if stored.get(k) != v]
    if diffs:
        hint = ""
        if stored.get("world_size") != now.get("world_size"):
            hint = (f". Resume with the same number of processes as the run that wrote it "
                    f"(torchrun --nproc_per_node {stored.get('world_size')}" + ")"
                    if stored.get("world_size", 1) > 1 else
                    ". Resume it as a single process (no torchrun)")
        raise ValueError(f"{path} was written with a different run layout; resuming would change the data "
                         f"order and the learning-rate schedule ({'; '.join(diffs)}){hint}")


def trim_metrics(path: Path, step: int) -> int:
    """Drop records after `step` and any test record from `metrics.jsonl`; returns how many were dropped.

    A run that is resumed from step `step` repeats everything after it; without this the log would
    hold those steps twice.
    """
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and _keep(json.loads(line), step)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


def _keep(record: dict, step: int) -> bool:
    return record.get("split") != "test" and record.get("step", 0) <= step


def sharded(tr) -> bool:
    """Whether this run's model and optimizer are sharded over the ranks (train.strategy=fsdp)."""
    return getattr(tr.cfg.train, "strategy", "ddp") == "fsdp" and tr.rt.world > 1


def _save_sharded(tr, folder: Path) -> None:
    """Model and optimizer shards of every rank into `folder` (collective), through a temporary
    folder, so that a kill mid-write leaves no half-written folder under the final name."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = folder.with_name(folder.name + ".tmp")
    if tr.rt.main:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(tr.model, tr.optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    dist.barrier()
    if tr.rt.main:
        os.replace(tmp, folder)


def _drop_other_folders(path: Path, keep: str) -> None:
    """Once `path` points at `keep`, the folders of its earlier versions can go."""
    import shutil

    for old in path.parent.glob(f"{path.stem}-step*.dcp"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_states(tr, ckpt: dict, path: Path, *, optimizer: bool = True) -> None:
    """Load a checkpoint's model (and optimizer) state into the run, sharded or not."""
    if "sharded" not in ckpt:
        tr.model.load_state_dict(ckpt["model"])
        if optimizer:
            tr.optimizer.load_state_dict(ckpt["optimizer"])
        return
    if not sharded(tr):
        raise ValueError(f"{path} holds a sharded (train.strategy=fsdp) checkpoint; load it with "
                         f"train.strategy=fsdp under torchrun")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    folder = path.parent / ckpt["sharded"]
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} names the sharded checkpoint folder {folder}, which does not exist")
    if optimizer:
        model_sd, optim_sd = get_state_dict(tr.model, tr.optimizer)
        states = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(states, checkpoint_id=str(folder))
        set_state_dict(tr.model, tr.optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
    else:
        states = {"model": get_model_state_dict(tr.model)}
        dcp.load(states, checkpoint_id=str(folder))
        set_model_state_dict(tr.model, states["model"])


def save(tr, path: Path) -> None:
    """Write a checkpoint atomically (collective under torchrun: every rank's RNG state is gathered)."""
    rng = [None] * tr.rt.world if tr.rt.world > 1 else rng_state()
    if tr.rt.world > 1:
        dist.all_gather_object(rng, rng_state())
    if sharded(tr):
        # One folder per saved step: the file is renamed over its predecessor only after its folder
        # is complete, so the file and the folder it names always belong together.
        folder = path.parent / f"{path.stem}-step{tr.state['step']:08d}.dcp"
        _save_sharded(tr, folder)
        weights = {"sharded": folder.name}
    else:
        weights = {"model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict()}
    if tr.rt.main:
        write_atomic({**weights, "scheduler": tr.scheduler.state_dict(), "state": dict(tr.state), "rng": rng,
                      "layout": tr.layout(), "config": tr.cfg.to_dict()}, path)
        if "sharded" in weights:
            _drop_other_folders(path, weights["sharded"])
    if sharded(tr):
        dist.barrier()

