"""Plots and tables of a synthetic sweep: `python -m experiments.synthetic.report SWEEP_DIR`.

Reads every `result.json` under `SWEEP_DIR/runs/` (written by `experiments.synthetic.run`) and
writes into SWEEP_DIR:

- `state_<task group>.png`: test accuracy against state bytes per sequence (log x; the state
  counted from each model's own `default_state`, the attention KV cache at the training length),
  one line per layer family;
- `induction_lengths.png`: induction-heads accuracy against the test length (multiples of the
  training length), one line per run;
- `results.md`: one table per task group (accuracy, state bytes, parameters, steps, CPU minutes)
  and the length table;
- `results.json`: the same numbers, one record per run.

Runs without a result yet are listed as unfinished and left out of the plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FAMILY_ORDER = ("s4d", "s4", "transformer", "mamba", "mamba2", "mamba3")
LABELS = {"s4d": "S4D", "s4": "S4 (DPLR)", "transformer": "Transformer (RoPE)", "mamba": "Mamba",
          "mamba2": "Mamba-2", "mamba3": "Mamba-3"}


def collect(sweep: Path) -> tuple[list[dict], list[str]]:
    """(one record per finished run, the keys of runs without a result)."""
    records, unfinished = [], []
    for folder in sorted(p for p in (sweep / "runs").glob("*/*") if p.is_dir()):
        key = f"{folder.parent.name}/{folder.name}"
        res = folder / "result.json"
        if not res.is_file():
            unfinished.append(key)
            continue
        r = json.loads(res.read_text())
        records.append({"group": folder.parent.name, "run": folder.name, "task": r["task"], "model": r["model"],
                        "d_model": r.get("d_model"), "d_state": r.get("d_state"), "n_params": r.get("n_params"),
                        "state_bytes": r.get("state_bytes"), "seq_len": r.get("seq_len"),
                        "test_acc": r["test_acc"], "best_val_acc": r.get("best_val_acc"),
                        "majority_rate": r.get("majority_rate"), "steps": r.get("steps"),
                        "completed": r.get("completed"), "cpu_minutes": r.get("cpu_seconds", 0.0) / 60,
                        "run_cpu_minutes": r.get("run_cpu_seconds", r.get("cpu_seconds", 0.0)) / 60,
                        "wall_minutes": r.get("train_seconds", 0.0) / 60, "task_config": r.get("task_config"),
                        "lengths": r.get("lengths", {})})
    return records, unfinished


def _family_order(model: str) -> int:
    return FAMILY_ORDER.index(model) if model in FAMILY_ORDER else len(FAMILY_ORDER)


def _sorted(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["group"], _family_order(r["model"]), r["state_bytes"] or 0))


def markdown(records: list[dict], unfinished: list[str]) -> str:
    lines = []
    for group in sorted({r["group"] for r in records}):
        rows = [r for r in _sorted(records) if r["group"] == group]
        knobs = ", ".join(f"{k}={v}" for k, v in (rows[0]["task_config"] or {}).items())
        lines += [f"### {group} ({knobs})", "",
                  "| model | run | d_model | d_state | state bytes | params | test acc % | best val % | steps "
                  "| train CPU min | run CPU min | train wall min |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {LABELS.get(r['model'], r['model'])} | {r['run']} | {r['d_model']} | "
                         f"{r['d_state'] if r['d_state'] is not None else '-'} | {r['state_bytes']:,} | "
                         f"{r['n_params']:,} | {100 * r['test_acc']:.1f} | {100 * (r['best_val_acc'] or 0):.1f} | "
                         f"{r['steps']} | {r['cpu_minutes']:.1f} | {r['run_cpu_minutes']:.1f} | "
                         f"{r['wall_minutes']:.1f} |")
        lines.append("")
    extrap = [r for r in _sorted(records) if len(r["lengths"]) > 1]
    if extrap:
        factors = sorted({int(f) for r in extrap for f in r["lengths"]})
        lines += ["### Test accuracy (%) against test length (multiples of the training length)", "",
                  "| group | run | " + " | ".join(f"{f}x" for f in factors) + " |",
                  "|---|---|" + "---|" * len(factors)]
        for r in extrap:
            cells = [f"{100 * r['lengths'][str(f)]['acc']:.1f}" if str(f) in r["lengths"] else "-" for f in factors]
            lines.append(f"| {r['group']} | {r['run']} | " + " | ".join(cells) + " |")
        lines.append("")
    if unfinished:
        lines += ["Unfinished (no result.json yet): " + ", ".join(unfinished), ""]
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_state(records: list[dict], group: str, path: Path) -> None:
    """Accuracy against state bytes (log x) for one task group, one line per family."""
    plt = _plt()
    rows = [r for r in _sorted(records) if r["group"] == group]
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in rows}, key=_family_order):
        pts = sorted((r["state_bytes"], 100 * r["test_acc"]) for r in rows if r["model"] == model)
        ax.plot(*zip(*pts), marker="o", label=LABELS.get(model, model))
    majority = max((r["majority_rate"] or 0) for r in rows)
    ax.axhline(100 * majority, color="gray", ls=":", lw=1, label="majority class")
    ax.set_xscale("log")
    ax.set(xlabel="state bytes per sequence (KV cache at the training length)", ylabel="test accuracy (%)",
           title=f"{group}", ylim=(-2, 102))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lengths(records: list[dict], path: Path) -> bool:
    """Accuracy against test length for every run tested at several lengths; False when none was."""
    rows = [r for r in _sorted(records) if len(r["lengths"]) > 1]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        pts = sorted((v["seq_len"], 100 * v["acc"]) for v in r["lengths"].values())
        ax.plot(*zip(*pts), marker="o", label=f"{LABELS.get(r['model'], r['model'])} {r['run'].split('-')[-1]}")
    ax.axvline(rows[0]["seq_len"], color="gray", ls="--", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="test sequence length", ylabel="test accuracy (%)", ylim=(-2, 102),
           title=f"{rows[0]['group']}: length extrapolation")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(sweep: Path, *, plots: bool = True) -> dict:
    records, unfinished = collect(sweep)
    if not records:
        raise FileNotFoundError(f"no result.json under {sweep / 'runs'} (run python -m experiments.synthetic.sweep)")
    (sweep / "results.json").write_text(json.dumps({"runs": records, "unfinished": unfinished}, indent=2))
    text = markdown(records, unfinished)
    (sweep / "results.md").write_text(text)
    written = [sweep / "results.json", sweep / "results.md"]
    if plots:
        for group in sorted({r["group"] for r in records}):
            plot_state(records, group, sweep / f"state_{group}.png")
            written.append(sweep / f"state_{group}.png")
        if plot_lengths(records, sweep / "induction_lengths.png"):
            written.append(sweep / "induction_lengths.png")
    return {"records": records, "unfinished": unfinished, "markdown": text, "written": written}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.synthetic.report",
                                description="Accuracy-vs-state-size plots, length-extrapolation curves and tables "
                                            "of a synthetic sweep folder.")
    p.add_argument("sweep", type=Path, help="the sweep folder (holds runs/<task>/<model>/result.json)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    args = p.parse_args(argv)
    try:
        out = write_report(args.sweep, plots=not args.no_plots)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(out["markdown"])
    for path in out["written"]:
        print(f"wrote {path}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
