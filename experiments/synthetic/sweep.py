"""A grid of synthetic-task runs: `python -m experiments.synthetic.sweep --out SWEEP_DIR`.

Models x sizes (d_model / d_state) x task difficulty, each configuration in its own run folder
`SWEEP_DIR/runs/<task>-<difficulty>/<model>-<size>` trained by `experiments.synthetic.run`. The
sweep is resumable: a folder with a finished `result.json` is skipped, one with a checkpoint is
resumed, one without either is started afresh; a configuration that fails is recorded in
`SWEEP_DIR/failures.jsonl` and the sweep goes on. Checkpoints are deleted once a run has its
result (`--keep-checkpoints` keeps them), so the folder holds only small files. Then
`python -m experiments.synthetic.report SWEEP_DIR` draws the plots and tables.

The default grid is CPU-sized (2-layer models of width 32 or less, sequences of 64 tokens;
induction heads tested up to 16x the training length); `--grid smoke` runs in seconds (tests).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from experiments.synthetic.config import MODELS


@dataclass(frozen=True)
class Entry:
    """One configuration: its folder name, task, model, preset and overrides (`section.field` -> text)."""

    group: str  # task and difficulty, e.g. "mqar-kv8"
    name: str  # model and size, e.g. "mamba-n16"
    task: str
    model: str
    preset: str = "default"
    overrides: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


# Model sizes: a name and the overrides that set it (state size through d_state; attention through width).
SIZES = {
    "s4d": [("n16", {"model.ssm.d_state": "16"}), ("n64", {"model.ssm.d_state": "64"})],
    "s4": [("n16", {"model.ssm.d_state": "16"}), ("n64", {"model.ssm.d_state": "64"})],
    "mamba": [("n4", {"model.mamba.d_state": "4"}), ("n16", {"model.mamba.d_state": "16"})],
    "mamba2": [("n16", {"model.mamba2.d_state": "16"}), ("n64", {"model.mamba2.d_state": "64"})],
    "mamba3": [("n16", {"model.mamba3.d_state": "16"}), ("n64", {"model.mamba3.d_state": "64"})],
    "transformer": [("d32", {"model.d_model": "32"}), ("d64", {"model.d_model": "64"})],
}
# Task difficulties: a name and the task overrides.
DIFFICULTIES = {
    "mqar": [("kv4", {"task.num_kv_pairs": "4"}), ("kv8", {"task.num_kv_pairs": "8"})],
    "selective_copy": [("n4", {"task.n_tokens": "4"})],
    "induction": [("l32", {})],
    "parity": [("l32", {})],
    "modadd": [("m3", {})],
}
# Tasks run at every size; the others at each family's larger size only (a CPU-sized grid).
DEFAULT_TASKS = ("mqar", "selective_copy", "parity", "induction")
ALL_SIZES = ("mqar", "selective_copy")


def default_grid(tasks=DEFAULT_TASKS, models=MODELS) -> list[Entry]:
    """Every task at each family's larger size first, then the smaller sizes, then the harder
    difficulties: a sweep stopped early still compares every family on every task."""
    passes = [[], [], []]
    for task in tasks:
        for level, (diff, task_over) in enumerate(DIFFICULTIES[task]):
            for model in models:
                sizes = SIZES[model] if task in ALL_SIZES else SIZES[model][-1:]
                for rank, (size, model_over) in enumerate(reversed(sizes)):
                    entry = Entry(f"{task}-{diff}", f"{model}-{size}", task, model,
                                  overrides={**task_over, **model_over})
                    passes[2 if level else min(rank, 1)].append(entry)
    return [e for p in passes for e in p]


def smoke_grid(tasks=("mqar", "parity"), models=("s4d", "transformer")) -> list[Entry]:
    return [Entry(task, model, task, model, preset="smoke", overrides={"train.progress": "false"})
            for task in tasks for model in models]


def status(run_dir: Path) -> str:
    """"done" (a completed result.json), "partial" (a checkpoint to resume) or "new"."""
    res = run_dir / "result.json"
    if res.is_file() and json.loads(res.read_text()).get("completed"):
        return "done"
    return "partial" if (run_dir / "last.pt").is_file() else "new"


def run_entry(entry: Entry, run_dir: Path, *, threads: int | None, keep_checkpoints: bool) -> dict:
    """Train one configuration (resuming it when it has a checkpoint); returns its result."""
    from experiments.synthetic.run import make_config, run

    overrides = dict(entry.overrides)
    if threads is not None:
        overrides.setdefault("train.threads", str(threads))
    overrides.setdefault("train.progress", "false")
    cfg = make_config(entry.task, entry.model, entry.preset, overrides)
    state = status(run_dir)
    if state == "new" and run_dir.exists():
        shutil.rmtree(run_dir)  # a start that never reached its first checkpoint: begin again cleanly
    import torch
    before = torch.get_num_threads()
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    try:
        result = run(cfg, out=run_dir, resume=state == "partial")
    finally:
        torch.set_num_threads(before)
    if result.get("completed") and not keep_checkpoints:
        for name in ("last.pt", "best.pt"):
            (run_dir / name).unlink(missing_ok=True)
    return result


def run_sweep(entries: list[Entry], out: Path, *, threads: int | None = 1, keep_checkpoints: bool = False,
              progress: bool = True) -> dict[str, str]:
    """Run every entry not yet done; returns {entry key: "done" | "skipped" | "failed" | "interrupted"}."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps([e.__dict__ for e in entries], indent=2))
    outcome = {}
    bar = tqdm(entries, desc="sweep", dynamic_ncols=True, disable=not progress)
    for entry in bar:
        run_dir = out / "runs" / entry.group / entry.name
        bar.set_postfix_str(entry.key)
        if status(run_dir) == "done":
            outcome[entry.key] = "skipped"
            continue
        t0 = time.time()
        try:
            result = run_entry(entry, run_dir, threads=threads, keep_checkpoints=keep_checkpoints)
        except KeyboardInterrupt:
            outcome[entry.key] = "interrupted"
            break
        except Exception as e:  # one broken configuration must not stop the others
            outcome[entry.key] = "failed"
            with open(out / "failures.jsonl", "a") as f:
                f.write(json.dumps({"entry": entry.key, "error": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc()}) + "\n")
            print(f"[sweep] {entry.key} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        if result.get("interrupted"):
            outcome[entry.key] = "interrupted"
            break
        outcome[entry.key] = "done"
        print(f"[sweep] {entry.key}: test acc {100 * result['test_acc']:.1f}% in {time.time() - t0:.0f} s "
              f"({result['cpu_seconds'] / 60:.1f} CPU min)", flush=True)
    bar.close()
    return outcome


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(prog="python -m experiments.synthetic.sweep",
                                description="Run a resumable grid of synthetic-task runs (models x sizes x task "
                                            "difficulty); rerun the same command to continue it.")
    p.add_argument("--out", type=Path, required=True, help="sweep folder (runs/<task>/<model>/ inside)")
    p.add_argument("--grid", default="default", choices=("default", "smoke"))
    p.add_argument("--tasks", nargs="+", default=None, choices=tuple(DIFFICULTIES),
                   help=f"tasks of the grid (default grid: {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--models", nargs="+", default=None, choices=MODELS, help="model families (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep last.pt / best.pt of finished runs")
    p.add_argument("--list", action="store_true", help="print the configurations and their status, then exit")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    kwargs = {k: v for k, v in (("tasks", args.tasks), ("models", args.models)) if v is not None}
    entries = default_grid(**kwargs) if args.grid == "default" else smoke_grid(**kwargs)
    if args.list:
        for e in entries:
            print(f"{status(args.out / 'runs' / e.group / e.name):8s} {e.key}  {e.overrides}")
        return {}
    outcome = run_sweep(entries, args.out, threads=args.threads, keep_checkpoints=args.keep_checkpoints)
    counts = {k: list(outcome.values()).count(k) for k in ("done", "skipped", "failed", "interrupted")}
    print(f"[sweep] {counts} -> {args.out}", flush=True)
    return outcome


if __name__ == "__main__":
    main()
