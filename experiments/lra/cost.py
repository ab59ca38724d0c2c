"""What the full LRA runs cost: `python -m experiments.lra.cost [--tasks ...] [--models ...] [--full-length]`.

For every task x model at `--preset paper`, in a fresh subprocess each (so peak memory is its own):
- FLOPs of one training step (forward + backward) counted by `torch.utils.flop_counter.FlopCounterMode`
  at batch 1 (and 2 for the SSM models) and extrapolated linearly to the preset's batch (the SSM filter
  is computed once per step whatever the batch: that part is the intercept; a Transformer step has
  none). FlopCounterMode counts matrix products, convolutions and attention only; it does not count
  FFTs, so every FFT call (`aten._fft_r2c`, `_fft_c2r`, `_fft_c2c`) is added with the radix-2 count
  5 n log2 n per complex transform of length n (2.5 n log2 n for a real one). Elementwise work (the
  Vandermonde/Cauchy exponentials, norms, activations) is not counted, and a complex matmul counts
  like a real one: the totals are lower bounds of the arithmetic.
- the forward FLOPs of one example (validation passes),
- one measured CPU training step (AdamW) at the full sequence length and batch `--batch` (default 1),
  after one unmeasured step; the peak resident memory added by the steps (float32, CPU),
- from the FLOPs an estimate of the GPU hours of the whole run (epochs x training steps + one
  validation pass per epoch) on one H100 at `--utilization` of its dense bf16 peak (989 TFLOP/s),
  next to the published per-epoch times of S4 (state-spaces/s4 `models/s4/experiments.md`).

`--full-length` instead runs two optimizer steps of the paper preset per task x model at the task's
full published length (batch 2; 1 for the Retrieval and Path-X Transformer) on generated official-format files,
through the data pipeline, and records seconds per step and peak memory.

Timings come from a shared, busy 2-core machine: noisy, for orientation only. Tasks: `docs/lra.md`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

from experiments.bench.timing import RssPeak
from experiments.lra.config import MODELS, TASKS, Config, sequence_length
from experiments.lra.presets import build_config, preset_config
from experiments.lra.schedules import lr_multiplier
from experiments.lra.tasks import task_info

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 peak (NVIDIA datasheet)
# state-spaces/s4 models/s4/experiments.md: S4 minutes per epoch and the GPU they were timed on.
PUBLISHED_EPOCH = {"listops": (15, "T4"), "text": (17, "T4"), "retrieval": (23, "A100"), "image": (2, "A100"),
                   "pathfinder": (7, "A100"), "pathx": (56, "A100")}


def _fft_flops(n: int, count: int, complex_input: bool) -> int:
    per = 5.0 * n * math.log2(max(n, 2))
    return int(count * (per if complex_input else per / 2))


def _numel(shape) -> int:
    return int(math.prod(shape))


def _r2c(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    n = _numel([x_shape[d] for d in dim])
    return _fft_flops(n, _numel(x_shape) // n, False)


def _c2r(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    n = _numel([out_shape[d] for d in dim])
    return _fft_flops(n, _numel(out_shape) // n, False)


def _c2c(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    n = _numel([x_shape[d] for d in dim])
    return _fft_flops(n, _numel(x_shape) // n, True)


def _cpu_flash(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_flash_backward(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def fft_flop_mapping() -> dict:
    """FlopCounterMode `custom_mapping`: the FFT counts (see the module docstring), and the CPU flash
    attention kernels, which FlopCounterMode knows only in their CUDA form (same formulas)."""
    aten = torch.ops.aten
    return {aten._fft_r2c: _r2c, aten._fft_c2r: _c2r, aten._fft_c2c: _c2c,
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


def example_batch(cfg: Config, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random full-length inputs (B, L) or (B, 2, L) and labels: the shapes of a paper-preset step."""
    info = task_info(cfg.task)
    L = sequence_length(cfg)
    shape = (batch, 2, L) if info.two_tower else (batch, L)
    low = 0 if info.is_pixel else 1  # id 0 is padding for token tasks
    x = torch.randint(low, info.vocab_size, shape, generator=generator)
    y = torch.randint(0, info.n_classes, (batch,), generator=generator)
    return x, y


def _train_flops(model, cfg, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x, y = example_batch(cfg, batch, torch.Generator().manual_seed(1))
    counter = FlopCounterMode(display=False, custom_mapping=fft_flop_mapping())
    with counter:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _forward_flops(model, cfg) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x, _ = example_batch(cfg, 1, torch.Generator().manual_seed(2))
    counter = FlopCounterMode(display=False, custom_mapping=fft_flop_mapping())
    model.eval()
    with torch.no_grad(), counter:
        model(x)
    model.train()
    return counter.get_total_flops()


def _timed_steps(model, cfg, batch: int) -> tuple[float, int]:
    """Seconds of the second of two AdamW steps at `batch`, and the peak RSS they added (bytes)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = example_batch(cfg, batch, torch.Generator().manual_seed(3))
    rss = RssPeak()
    seconds = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        seconds = time.perf_counter() - t0
    return seconds, rss.added()


def measure_case(task: str, model_name: str, batch: int, timed: bool = True) -> dict:
    """All numbers of one task x model (runs in the calling process)."""
    from experiments.lra.models import build_model

    torch.manual_seed(0)
    cfg = preset_config(task, model_name, "paper")
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    timing = _timed_steps(model, cfg, batch) if timed else None  # first: the FLOP passes raise the peak
    f1 = _train_flops(model, cfg, 1)
    # A Transformer step is exactly linear in the batch; an SSM step also computes its filter once.
    f2 = 2 * f1 if model_name == "transformer" else _train_flops(model, cfg, 2)
    out = {"task": task, "model": model_name, "seq_len": sequence_length(cfg), "params": n_params,
           "paper_batch": cfg.data.batch_size, "flops_b1": f1, "flops_b2": f2,
           "flops_step": f1 + (f2 - f1) * (cfg.data.batch_size - 1), "flops_fwd_example": _forward_flops(model, cfg),
           "batch": batch}
    if timing is not None:
        out["cpu_step_s"], out["peak_rss_bytes"] = timing
    return out


def run_steps(task: str, model_name: str) -> int:
    """Optimizer steps of the whole paper run (the schedule's own count where it is step-bounded)."""
    cfg = preset_config(task, model_name, "paper")
    per_epoch = math.ceil(task_info(task).n_train / cfg.data.batch_size)
    steps = cfg.train.epochs * per_epoch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps is not None else steps


def gpu_hours(row: dict, utilization: float) -> float:
    """Estimated H100 hours of the whole run: training steps plus one validation pass per epoch."""
    cfg = preset_config(row["task"], row["model"], "paper")
    steps = run_steps(row["task"], row["model"])
    epochs = math.ceil(steps * cfg.data.batch_size / task_info(row["task"]).n_train)
    val = epochs * task_info(row["task"]).n_val * row["flops_fwd_example"]
    return (steps * row["flops_step"] + val) / (H100_BF16_DENSE * utilization) / 3600.0


# ---- every task at its full published length ------------------------------------------------
_WORDS = ("state", "space", "sequence", "kernel", "long", "range", "arena", "filter", "paper", "model")


def _long_text(rng, n_bytes: int) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < n_bytes:
        words.append(_WORDS[rng.randrange(len(_WORDS))])
    return " ".join(words)


def write_full_length(root, task: str, n: int = 4):
    """Official-format files whose examples all reach the task's full length; returns the data_dir.

    ListOps: flat `[MAX d ... d ]` trees of exactly 2,000 tokens (label: their maximum); Text and
    Retrieval: documents longer than 4,096 / 4,000 bytes; the image tasks use the fixtures of
    `experiments.lra.data.fixtures`, whose images have the full size already.
    """
    import random
    from pathlib import Path

    from experiments.lra.data.fixtures import write_fixtures
    root, rng, info = Path(root), random.Random(11), task_info(task)
    if info.is_pixel:
        return write_fixtures(root, task)
    if task == "listops":
        (root / "listops-1000").mkdir(parents=True, exist_ok=True)
        for split in ("train", "val", "test"):
            lines = ["Source\tTarget"]
            for _ in range(n):
                digits = [rng.randrange(10) for _ in range(info.seq_len - 2)]
                lines.append("( [MAX " + " ".join(map(str, digits)) + f" ] )\t{max(digits)}")
            (root / "listops-1000" / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    elif task == "text":
        for split in ("train", "test"):
            for pol in ("pos", "neg"):
                folder = root / "aclImdb" / split / pol
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n // 2):
                    (folder / f"{i}_{8 if pol == 'pos' else 2}.txt").write_text(_long_text(rng, info.seq_len + 100))
    else:
        (root / "tsv_data").mkdir(parents=True, exist_ok=True)
        for split in ("train", "eval", "test"):
            rows = [f"{i % 2}\tA{i}\tB{i}\t{_long_text(rng, info.seq_len + 100)}\t{_long_text(rng, info.seq_len + 100)}"
                    for i in range(n)]
            (root / "tsv_data" / f"new_aan_pairs.{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def full_length_steps(task: str, model_name: str, data_dir, batch: int, steps: int = 2) -> dict:
    """`steps` optimizer steps of the paper preset at the task's full length (batch reduced to
    `batch`) through the data pipeline; seconds per step, losses and the peak RSS the steps added."""
    from torch.utils.data import DataLoader

    from experiments.lra.data import collate, load_task
    from experiments.lra.models import build_model, make_optimizer

    cfg = build_config(task, model_name, "paper", {"data.batch_size": str(batch), "data.max_len": "None"})
    torch.manual_seed(cfg.train.seed)
    loader = DataLoader(load_task(task, data_dir)["train"], batch_size=batch, shuffle=False, collate_fn=collate)
    model = build_model(cfg)
    opt = make_optimizer(model, cfg)
    paper_batch = preset_config(task, model_name, "paper").data.batch_size
    total = cfg.train.epochs * math.ceil(task_info(task).n_train / paper_batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_multiplier(cfg.optim, t, total))
    rss = RssPeak()
    losses, seconds, shape = [], [], None
    for _, (x, lengths, y) in zip(range(steps), loader):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x, lengths), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
        shape = list(x.shape)
    return {"task": task, "model": model_name, "batch": batch, "input_shape": shape, "losses": losses,
            "seconds": seconds, "peak_rss_bytes": rss.added()}


def _subprocess_json(args: list[str], timeout: float, task: str, model: str) -> dict:
    cmd = [sys.executable, "-m", "experiments.lra.cost", *args]
    env = dict(os.environ, SSMKIT_DISABLE_TRITON="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"task": task, "model": model, "error": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines() or [f"exit status {res.returncode}"]
        return {"task": task, "model": model, "error": lines[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _subprocess_case(task: str, model: str, batch: int, timeout: float, *, timed: bool = True) -> dict:
    args = ["--one", task, model, "--batch", str(batch)] + ([] if timed else ["--no-time"])
    return _subprocess_json(args, timeout, task, model)


def full_length_batch(task: str, model: str) -> int:
    """Reduced batch of the full-length check: 2; 1 for the Transformer on Retrieval and Path-X, where
    CPU attention over 2 x 4,000 / 16,384 positions took 14 / 8 GiB at batch 2 / 1."""
    return 1 if (task in ("retrieval", "pathx") and model == "transformer") else 2


def run_full_length(tasks, models, timeout: float) -> list[dict]:
    """Two paper-preset steps per task x model at full length, each in its own process."""
    import tempfile
    from pathlib import Path

    rows = []
    with tempfile.TemporaryDirectory(prefix="lra_full_") as tmp:
        for task in tasks:
            data_dir = write_full_length(Path(tmp) / task, task)
            for model in models:
                args = ["--full-one", task, model, str(data_dir), "--batch", str(full_length_batch(task, model))]
                rows.append(_subprocess_json(args, timeout, task, model))
                print(f"[full-length] {task} {model}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def full_length_markdown(rows: list[dict]) -> str:
    lines = ["| task | model | input (batch, ..., length) | s / step (2 steps) | loss | peak RSS added |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['model']} | {r['error']} | | | |")
            continue
        secs = ", ".join(f"{t:.1f}" for t in r["seconds"])
        loss = ", ".join(f"{v:.3f}" for v in r["losses"])
        lines.append(f"| {r['task']} | {r['model']} | {tuple(r['input_shape'])} | {secs} | {loss} "
                     f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def _fmt_flops(f: float) -> str:
    return f"{f / 1e12:.2f} T" if f >= 1e11 else f"{f / 1e9:.1f} G"


def markdown(rows: list[dict], utilization: float) -> str:
    """The README section between the `cost` markers."""
    lines = ["| task | model | length | params | batch | FLOPs / step | CPU s / step (batch) | peak RSS added "
             "| steps | est. H100 h | published S4 |", "|---" * 11 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['model']} | | | | | {r['error']} | | | | |")
            continue
        minutes, gpu = PUBLISHED_EPOCH[r["task"]]
        epochs = preset_config(r["task"], r["model"], "paper").train.epochs
        published = f"{minutes} min/epoch ({gpu}) = {minutes * epochs / 60:.1f} h" if r["model"] == "s4" else ""
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if "peak_rss_bytes" in r else ""
        cpu = f"{r['cpu_step_s']:.1f} ({r['batch']})" if "cpu_step_s" in r else ""
        lines.append(f"| {r['task']} | {r['model']} | {r['seq_len']} | {r['params'] / 1e6:.2f} M | {r['paper_batch']} "
                     f"| {_fmt_flops(r['flops_step'])} | {cpu} | {rss} | {run_steps(r['task'], r['model'])} "
                     f"| {gpu_hours(r, utilization):.2f} | {published} |")
    return "\n".join(lines)


def _published_ratio(rows: list[dict], utilization: float) -> tuple[float, float]:
    """Range of (published S4 hours on an A100) / (FLOP-based H100 estimate) over the S4 rows."""
    ratios = []
    for r in rows:
        if r.get("model") == "s4" and "error" not in r and PUBLISHED_EPOCH[r["task"]][1] == "A100":
            hours = PUBLISHED_EPOCH[r["task"]][0] * preset_config(r["task"], "s4", "paper").train.epochs / 60
            ratios.append(hours / gpu_hours(r, utilization))
    return (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan"))


def readme_section(rows: list[dict], full_rows: list[dict], utilization: float) -> str:
    """The README section between the `cost` markers, from the rows of both runs."""
    lo, hi = _published_ratio(rows, utilization)
    return "\n".join([
        "### What reproducing the table takes", "",
        "`python -m experiments.lra.cost` (about an hour on 2 CPU cores) measures, for every task x model at "
        "`--preset paper`: FLOPs of one training step at the preset's batch (`torch.utils.flop_counter` on "
        "the CPU at batch 1 and 2, extrapolated linearly; FlopCounterMode does not count FFTs, so each FFT "
        "call is added as 5 n log2 n per complex transform of length n, 2.5 n log2 n per real one; "
        "elementwise work is not counted, so these are lower bounds), one measured CPU step at the full "
        "length with batch 1 (float32; the machine was shared with other jobs, so times are noisy: the "
        "same step varied up to 4x between runs; for orientation only) and the peak resident memory that "
        "step added.", "",
        f"The H100 hours are an **estimate from FLOPs alone**: (training steps x FLOPs per step + one "
        f"validation pass per epoch) at {utilization:.0%} of one H100's dense bf16 peak (989 TFLOP/s). For "
        f"the S4 models this is far too low: S4's own published A100 times (last column, from state-spaces/s4 "
        f"`models/s4/experiments.md`, times the preset's epochs) are {lo:.0f} to {hi:.0f} times longer. These "
        "models are small (about 1 to 4 M parameters), so a step is bound by memory traffic (FFTs, the "
        "filter's elementwise complex arithmetic, norms), kernel launches, evaluation and data loading, not "
        "by arithmetic. Plan with the published per-epoch times (scaled to your GPU); the FLOP column says "
        "what the arithmetic alone would allow. None of these runs has been made on a GPU here.", "",
        markdown(rows, utilization), "",
        "Every task at its full published length: two optimizer steps of the paper preset (schedule, "
        "optimizer groups, clipping as configured) on generated official-format files through the data "
        "pipeline, batch 2 (Retrieval and Path-X Transformer: 1), CPU float32, each in its own process: "
        "`python -m experiments.lra.cost --full-length` (also a slow test: "
        "`pytest tests/experiments/test_lra_full_length.py --run-slow`). The first step runs at learning "
        "rate 0 (the warmup starts at 0), so the two losses differ only by their batch (and dropout).", "",
        full_length_markdown(full_rows)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.lra.cost", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=1, help="batch of the measured CPU steps")
    p.add_argument("--utilization", type=float, default=0.3, help="fraction of the H100 bf16 dense peak")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    p.add_argument("--no-time", action="store_true", help="count FLOPs only (no measured steps)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--full-length", action="store_true",
                   help="instead: two paper-preset optimizer steps per task at its full length (reduced batch)")
    p.add_argument("--one", nargs=2, metavar=("TASK", "MODEL"), help=argparse.SUPPRESS)
    p.add_argument("--full-one", nargs=3, metavar=("TASK", "MODEL", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full_length and args.no_time:
        p.error("--no-time does not apply to --full-length (it measures the steps' time and memory)")
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(measure_case(*args.one, batch=args.batch, timed=not args.no_time)))
        return
    if args.full_one:
        print(json.dumps(full_length_steps(*args.full_one, batch=args.batch)))
        return
    if args.full_length:
        rows = run_full_length(args.tasks, args.models, args.timeout)
    else:
        rows = []
        for task in args.tasks:
            for model in args.models:
                rows.append(_subprocess_case(task, model, args.batch, args.timeout, timed=not args.no_time))
                print(f"[cost] {task} {model}: {rows[-1]}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(full_length_markdown(rows) if args.full_length else markdown(rows, args.utilization))


if __name__ == "__main__":
    main()
