"""Evaluation of an LRA run: loss and accuracy over a split (summed across ranks), validation with
`best.pt` kept up to date, and the final report (test accuracy of the best-validation checkpoint,
`result.json`)."""
from __future__ import annotations

import functools
import json

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from experiments.lra import checkpoint as ckpt_io
from experiments.lra.checkpoint import save
from experiments.lra.data import collate
from experiments.lra.packing import throughput
from experiments.lra.trainer import ShardSampler, Trainer


def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _lockstep(loader, device, world: int):
    """The loader's batches, then repeats of its last batch (marked False) until every rank has run
    as many forwards as the rank with the most: a sharded (FSDP) model gathers its parameters in
    every forward, a collective that all ranks must join."""
    n = torch.tensor([len(loader)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    batch = None
    for batch in loader:
        yield batch, True
    for _ in range(int(n) - len(loader)):
        yield batch, False


@torch.no_grad()
def evaluate(model, loader, *, device, amp: bool, n_classes: int, world: int, lockstep: bool = False) -> dict:
    """Loss, accuracy, majority-class rate and mean real length over the loader (summed across ranks).

    Counts are over labelled targets: examples, or positions when the model returns per-position
    logits; "mean_len" is per example. lockstep: every rank runs the same number of forwards (FSDP)."""
    model.eval()
    loss_sum, correct, count, len_sum, n_seq = 0.0, 0.0, 0.0, 0.0, 0.0
    hist = torch.zeros(n_classes, dtype=torch.float64)
    batches = _lockstep(loader, device, world) if lockstep else ((b, True) for b in loader)
    for (x, lengths, y), counted in batches:
        if not counted:
            model(x.to(device), lengths.to(device))
            continue
        x, lengths, y = x.to(device), lengths.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x, lengths)  # (B, n_classes)
        # Per-position logits (B, L, C) flatten like per-example ones; targets of -100 are ignored.
        logits, y = logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)
        labelled = y != -100
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(-1) == y)[labelled].sum())
        count += float(labelled.sum())
        len_sum += float(lengths.float().mean(-1).sum()) if lengths.dim() == 2 else float(lengths.sum())
        n_seq += lengths.shape[0]
        hist += torch.bincount(y[labelled].cpu(), minlength=n_classes).double()
    stats = _all_sum([loss_sum, correct, count, len_sum, n_seq] + hist.tolist(), device, world)
    loss_sum, correct, count, len_sum, n_seq, hist = stats[0], stats[1], stats[2], stats[3], stats[4], stats[5:]
    if count == 0:
        raise ValueError("evaluation saw no examples")  # load_splits refuses empty splits before this
    return {"loss": loss_sum / count, "acc": correct / count, "n": int(count), "majority": max(hist) / count,
            "mean_len": len_sum / n_seq}


def eval_split(tr: Trainer, split: str) -> dict:
    ds = tr.splits[split]
    loader = DataLoader(ds, batch_size=tr.cfg.data.eval_batch_size or tr.cfg.data.batch_size,
                        sampler=ShardSampler(len(ds), num_replicas=tr.rt.world, rank=tr.rt.rank),
                        collate_fn=tr.collate or functools.partial(collate, pad_id=0),
                        num_workers=tr.cfg.data.num_workers,
                        generator=torch.Generator().manual_seed(0))
    return evaluate(tr.model, loader, device=tr.rt.device, amp=tr.rt.amp, n_classes=tr.task.n_classes,
                    world=tr.rt.world, lockstep=ckpt_io.sharded(tr))


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


def finish(tr: Trainer, stopped: bool) -> dict:
    """Test the best-validation checkpoint, write result.json and print the result line."""
    s, cfg, rt = tr.state, tr.cfg, tr.rt
    if s["val_step"] != s["step"]:
        validate(tr)  # e.g. --max-steps 0 on a fresh run: nothing validated yet
    if rt.world > 1:
        dist.barrier()
    best = torch.load(tr.best_path, map_location=rt.device, weights_only=False)
    ckpt_io.load_states(tr, best, tr.best_path, optimizer=False)
    test = eval_split(tr, "test")
    tr.log(split="test", step=best["state"]["step"], loss=test["loss"], acc=test["acc"])
    result = {"task": cfg.task, "model": cfg.model_name, "preset": cfg.preset, "test_acc": test["acc"],
              "test_loss": test["loss"], "n_test": test["n"], "majority_rate": test["majority"],
              "test_mean_len": test["mean_len"],
              "best_val_acc": s["best_val_acc"], "best_step": s["best_step"], "steps": s["step"],
              "epochs_done": s["epoch"], "train_seconds": s["seconds"], "completed": not stopped,
              "n_params": sum(p.numel() for p in tr.model.parameters()), **throughput(s), "config": cfg.to_dict()}
    if rt.main:
        (tr.out / "result.json").write_text(json.dumps(result, indent=2))
        print(f"\n[{tr.tag}] TEST ACCURACY {cfg.task}/{cfg.model_name}: {100 * test['acc']:.2f}%  "
              f"(n={test['n']}, majority class {100 * test['majority']:.2f}%, best val "
              f"{100 * s['best_val_acc']:.2f}% at step {s['best_step']}) -> {tr.out / 'result.json'}", flush=True)
    return result
