"""The LRA training loop: one optimizer step, the bookkeeping after it (log, periodic validation
and checkpoint), epochs, and stopping on SIGINT/SIGTERM or `train.max_steps`."""
from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from experiments.lra.checkpoint import save
from experiments.lra.evaluate import validate
from experiments.lra.packing import batch_tokens, logits_of, throughput
from experiments.lra.trainer import Trainer


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


def train_step(tr: Trainer, x, lengths, y) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step on a batch; returns (loss, logits, the lr of the first group for this step).

    `lengths`: the padded batch's (B,) lengths, or the `PackedBatch` of a packed one (logits then
    come one per example, or per packed position, aligned with `y`)."""
    device, cfg = tr.rt.device, tr.cfg
    tr.ddp_model.train()
    x, lengths, y = x.to(device), lengths.to(device), y.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tr.rt.amp):
        logits = logits_of(tr.ddp_model, x, lengths)  # (B, n_classes): one row per example
    # Per-position logits (B, L, C) with targets (B, L) flatten like per-example ones; targets of
    # -100 (positions without a label) are ignored.
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:  # 0 (or less) disables clipping
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.optim.grad_clip)
    lr = tr.optimizer.param_groups[0]["lr"]  # read before scheduler.step() sets the next step's
    tr.optimizer.step()
    tr.scheduler.step()
    return loss, logits, lr


def _count(tr: Trainer, x: torch.Tensor, lengths, seconds: float) -> None:
    """Add a step's real tokens, computed positions and step time to the run's counters."""
    s = tr.state
    real, slots = batch_tokens(x, lengths)
    s["tokens"] += real
    s["slots"] += slots
    s["step_seconds"] += seconds


def _after_step(tr: Trainer, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, lr: float) -> None:
    """Bookkeeping of one step: counters, time, train log, periodic validation and checkpoint."""
    s, cfg = tr.state, tr.cfg
    s["step"] += 1
    s["batch_in_epoch"] += 1
    now = time.perf_counter()
    s["seconds"] += now - tr.tick
    tr.tick = now
    cpu = time.process_time()
    s["cpu_seconds"] = s.get("cpu_seconds", 0.0) + cpu - tr.cpu_tick
    tr.cpu_tick = cpu
    if s["step"] % cfg.train.log_every == 0 or s["step"] == 1:
        y = y.to(logits.device)
        labelled = y != -100
        acc = float((logits.argmax(-1) == y)[labelled].float().mean())
        rate = throughput(s)
        tr.log(split="train", step=s["step"], epoch=s["epoch"], loss=loss.item(), acc=acc,
               lr=lr, seconds=s["seconds"], tokens=rate["train_tokens"], tokens_per_s=rate["tokens_per_s"],
               pad_frac=rate["pad_frac"])
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
    tr.tick, tr.cpu_tick = time.perf_counter(), time.process_time()
    begun = tr.tick  # a step's time: from asking for its batch to the end of its update
    try:
        for x, lengths, y in tr.train_loader:
            loss, logits, lr = train_step(tr, x, lengths, y)
            value = loss.item()  # waits for the step (CUDA runs asynchronously)
            _count(tr, x, lengths, time.perf_counter() - begun)
            _after_step(tr, loss, logits, y, lr)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
            if should_stop():
                return True
            begun = time.perf_counter()
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
