"""Train one model on one synthetic task: `python -m experiments.synthetic.run --task mqar --model mamba2`.

The LRA trainer does the work (`experiments.lra`: its loop, validation, checkpoints, resume and
`metrics.jsonl` / `result.json`); `experiments.synthetic.build` supplies the per-position model,
the streamed splits and the collate. Before any work the config is validated and a run folder
that already holds a run is refused unless `--resume`. Every model is causal; the loss and the
accuracy count only labelled positions (targets of -100 elsewhere).

`RUN_DIR/result.json` holds the LRA fields (test accuracy of the best-validation checkpoint, ...)
plus the synthetic ones: `state_bytes` (per sequence at the training length, from the model's own
`default_state`, `experiments.synthetic.state_size`), `lengths` (test accuracy at each
`data.eval_lengths` multiple of the training length), `cpu_seconds` (process CPU time of the
training steps, summed over resumes), `run_cpu_seconds` (process CPU time of this invocation:
building, training, testing) and the task's knobs. Tasks and findings: `docs/synthetic.md`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from experiments.lra import checkpoint as ckpt_io
from experiments.lra.evaluate import finish
from experiments.lra.loop import Stopper, train_loop
from experiments.lra.overrides import parse_cli
from experiments.lra.trainer import read_resume, run_in_process, setup_device, start
from experiments.synthetic.build import build, length_results
from experiments.synthetic.config import MODELS, PRESETS, Config, apply_overrides, preset_config, validate
from experiments.synthetic.data import TASKS
from experiments.synthetic.state_size import state_bytes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.synthetic.run",
        description="Train a causal S4D / S4 / Transformer (RoPE) / Mamba / Mamba-2 model on a synthetic task "
                    "(MQAR, selective copying, induction heads, parity, addition mod m, S_5).",
        epilog="Any config field can be overridden as --section.field=value. Sections: task (the task's knobs, "
               "e.g. --task.num_kv_pairs=8 --task.seq_len=128), data (batch_size, n_train, n_val, n_test, "
               "eval_lengths='1,2,4'), model (d_model, n_layers and the layer configs: --model.ssm.d_state=32 for "
               "s4d/s4, --model.mamba.d_state, --model.mamba2.headdim, --model.attention.n_heads), optim (lr, ...), "
               "train (epochs, eval_every, checkpoint_every, threads, ...). --data.pack=true trains on rows of several "
               "whole samples laid end to end (packed, --data.pack_len tokens a row; docs/packing.md). "
               "--print-config shows all fields. "
               "A grid of runs: python -m experiments.synthetic.sweep.")
    p.add_argument("--task", required=True, choices=tuple(TASKS))
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--preset", default="default", choices=PRESETS,
                   help="default: CPU-sized task and model; smoke: seconds, for tests")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/synthetic/TASK-MODEL-PRESET)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint) after N optimizer steps in total; the schedule is unchanged")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def make_config(task: str, model: str, preset: str, overrides: dict[str, str], *, max_steps=None,
                seed=None) -> Config:
    """The preset's config with `overrides` and the command-line extras applied, validated."""
    cfg = apply_overrides(preset_config(task, model, preset), overrides)
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    if seed is not None:
        cfg.train.seed = seed
    return validate(cfg)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    return parse_cli(build_parser(), argv, lambda args, overrides: make_config(
        args.task, args.model, args.preset, overrides, max_steps=args.max_steps, seed=args.seed), "synthetic")


def format_config(cfg: Config) -> str:
    lines = []

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            lines.append(f"{prefix} = {value}")
    d = cfg.to_dict()
    d["task"] = {"name": d.pop("task"), **d.pop("task_config")}
    walk("", d)
    return "\n".join(lines)


def _check_task_config(ckpt: dict, cfg: Config) -> None:
    stored, now = ckpt["config"].get("task_config"), cfg.to_dict()["task_config"]
    if stored != now:
        diffs = [f"task.{k}: {stored.get(k)!r} -> {v!r}" for k, v in now.items() if (stored or {}).get(k) != v]
        raise ValueError("--resume with a different config than the checkpoint: " + "; ".join(diffs))


def run(cfg: Config, *, out: Path, resume: bool = False) -> dict:
    """Train, test the best-validation checkpoint (at every eval length), write result.json; returns it.

    Everything that can refuse the run (config, the checkpoint to resume) happens before the run
    folder is created or touched.
    """
    validate(cfg)
    cpu0 = time.process_time()
    rt = setup_device(cfg)
    ckpt = read_resume(cfg, out, rt, resume)
    if ckpt is not None:
        _check_task_config(ckpt, cfg)
    try:
        tr = build(cfg, rt, out)
    except (ValueError, TypeError) as e:  # a layer refusing its settings: name the config section
        raise ValueError(f"--model {cfg.model_name} with these --model.* settings: {e}") from e
    if ckpt is not None:
        ckpt_io.check_layout(ckpt.get("layout"), tr.layout(), tr.last_path)
    out.mkdir(parents=True, exist_ok=True)
    start(tr, ckpt)
    with Stopper(tr) as should_stop:
        stopped = train_loop(tr, should_stop)
    if should_stop.signalled:
        return {"interrupted": True, "step": tr.state["step"]}
    result = finish(tr, stopped)
    lengths = length_results(tr)
    t = cfg.task_config
    result.update(task_config=dataclasses.asdict(t), seq_len=t.seq_len, lengths=lengths,
                  state_bytes=state_bytes(tr.model, seq_len=t.seq_len),
                  d_model=cfg.model.d_model, n_layers=cfg.model.n_layers, d_state=_d_state(cfg),
                  cpu_seconds=tr.state.get("cpu_seconds", 0.0), run_cpu_seconds=time.process_time() - cpu0)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if len(lengths) > 1:
        tr.say("test accuracy by length: " + ", ".join(f"{v['seq_len']}: {100 * v['acc']:.1f}%"
                                                       for v in lengths.values()))
    return result


def _d_state(cfg: Config) -> int | None:
    layer = cfg.to_dict()["model"]["layer"]
    return layer.get("d_state")


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(argv)
    if args.print_config:
        print(format_config(cfg))
        return {}
    return run_in_process(cfg, lambda: run(cfg, out=args.out, resume=args.resume))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # no traceback for these
        sys.exit(f"error: {err}")
