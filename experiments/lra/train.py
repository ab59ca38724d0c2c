"""Train an LRA model: `python -m experiments.lra.train --task T --model M --data-dir DIR ...`.

AdamW over `ssm.param_groups` (SSM parameters keep their own lr, no weight decay),
the learning-rate schedule of `schedules.lr_multiplier` (`optim.schedule`), optional gradient clipping
(`optim.grad_clip = 0`: none), bf16 autocast on CUDA. Before any
work the config is validated, the data is checked (no empty split, a full batch of training
examples, truncation reported) and one step's peak memory is estimated; a run that will not fit is
refused (`--force` starts it anyway). Only then is the run folder created.

Metrics stream to `RUN_DIR/metrics.jsonl` (train records with real tokens per second and the
padding fraction); `--data.pack=true` trains on packed rows of whole examples
(`experiments.lra.packing`, docs/packing.md). `RUN_DIR/last.pt` is written atomically at every epoch
end, every `train.checkpoint_every` steps, at `--max-steps` and on SIGINT/SIGTERM, and `--resume`
continues from it exactly (model, optimizer, scheduler, RNG states and the position inside the
epoch's shuffled order; see `experiments.lra.checkpoint` for what is checked). The
best-validation checkpoint (`best.pt`) is evaluated on the test split at the end; the result goes
to `RUN_DIR/result.json`. Under `torchrun` (WORLD_SIZE > 1) it runs DistributedDataParallel with a
DistributedSampler (nccl on CUDA, gloo on CPU). Tasks, presets and settings: `docs/lra.md`.

The run is built in `trainer` (runtime, data, model, optimizer, schedule), trained in `loop`,
evaluated and reported in `evaluate`, and checkpointed by `checkpoint`; this module is the command
line and `run`, which calls them in order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from experiments.lra import checkpoint as ckpt_io
from experiments.lra.config import MODELS, PRESETS, TASKS, Config, validate
from experiments.lra.evaluate import finish
from experiments.lra.loop import Stopper, train_loop
from experiments.lra.overrides import apply_overrides, format_config, parse_cli
from experiments.lra.presets import preset_config
from experiments.lra.trainer import (build, check_memory, load_splits, read_resume, run_in_process, setup_device,
                                     start)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.lra.train",
        description="Train S4 / S4D / Transformer on a Long Range Arena task.",
        epilog="Any config field can be overridden as --section.field=value (sections: data, model, optim, "
               "train), nested layer settings as --model.ssm.d_state=64 or --model.block.norm=batch, e.g. "
               "--optim.lr=3e-3. --data.pack=true trains on rows of whole examples laid end to end (packed, with "
               "--data.pack_len tokens a row; docs/packing.md). --print-config shows all fields.")
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


def _make_config(args: argparse.Namespace, overrides: dict[str, str]) -> Config:
    cfg = apply_overrides(preset_config(args.task, args.model, args.preset), overrides)
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
        cfg.train.max_steps = args.max_steps
    if args.seed is not None:
        cfg.train.seed = args.seed
    validate_config(cfg)
    return cfg


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    return parse_cli(build_parser(), argv, _make_config, "lra")


def validate_config(cfg: Config) -> None:
    """`config.validate` (ranges, divisibility, finite numbers) plus the trainer's own requirements."""
    validate(cfg)
    every = getattr(cfg.train, "checkpoint_every", None)
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"--train.checkpoint_every must be a positive number of steps or None, got {every!r}")


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
    return run_in_process(cfg, lambda: run(cfg, data_dir=args.data_dir, out=args.out, resume=args.resume,
                                           force=args.force))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, MemoryError, ValueError) as err:  # no traceback for these
        sys.exit(f"error: {err}")
