"""Markdown table of LRA test accuracies next to the published numbers (`docs/lra.md`), and curves.

`python -m experiments.lra.report RUN_DIR...` reads each run's `result.json` (written by
`experiments.lra.train`; a folder without one is searched one level down, so the quick start's
output folder works as is) and prints one row per (model, preset) with the six task columns, next
to the published rows. The average follows the LRA convention (Path-X failure counts as 50) and is
only given for rows that have all six tasks. A run folder that has not finished yet (no
`result.json`) is skipped with a one-line note. For every run it reads, it writes
`RUN_DIR/curves.png`: validation accuracy and loss against the training step (`--no-plots` skips).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASK_COLUMNS = (("listops", "ListOps"), ("text", "Text"), ("retrieval", "Retrieval"), ("image", "Image"),
                ("pathfinder", "Pathfinder"), ("pathx", "Path-X"))
# Published test accuracies (sources in docs/lra.md); None = failed (counts as 50 in the average).
PUBLISHED = {
    "Transformer (LRA paper)": (36.37, 64.27, 57.46, 42.44, 71.40, None),
    "S4 (updated, LegS)": (59.60, 86.82, 90.90, 88.65, 94.20, 96.35),
    "S4D-LegS": (60.47, 86.18, 89.46, 88.19, 93.06, 91.95),
    "S5": (62.15, 89.31, 91.40, 88.00, 95.33, 98.58),
    "Mega": (63.14, 90.43, 91.25, 90.44, 96.01, 97.98),
}
MODEL_LABELS = {"s4": "S4", "s4d": "S4D", "transformer": "Transformer"}


RUN_MARKERS = ("last.pt", "metrics.jsonl", "config.json")  # files a started run folder holds


def _is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_MARKERS)


def _unfinished_note(folder: Path) -> str:
    steps = [json.loads(line).get("step", 0) for line in (folder / "metrics.jsonl").read_text().splitlines()
             if line.strip()] if (folder / "metrics.jsonl").is_file() else []
    at = f" (last logged step {max(steps)})" if steps else ""
    return f"note: skipping {folder}: unfinished run, no result.json yet{at}"


def find_results(paths: list[str | Path], *, notes=None) -> list[dict]:
    """The `result.json` of each run folder (or of its immediate subfolders).

    Run folders without a result (still training, stopped by a signal) and paths that are no run
    (a data folder or a summary file caught by `runs/*`) are skipped with a one-line note each, sent
    to `notes` (a callable; default: print to stderr). FileNotFoundError when no result is found.
    """
    notes = notes or (lambda text: print(text, file=sys.stderr))
    files = []
    for p in map(Path, paths):
        if p.is_file():
            if p.name == "result.json":
                files.append(p)
            else:
                notes(f"note: skipping {p}: not a run folder or result.json")
        elif (p / "result.json").is_file():
            files.append(p / "result.json")
        else:
            found = sorted(p.glob("*/result.json"))
            unfinished = [p] if _is_run(p) else [d for d in sorted(p.glob("*"))
                                                   if _is_run(d) and not (d / "result.json").is_file()]
            for folder in unfinished:
                notes(_unfinished_note(folder))
            if not found and not unfinished:
                notes(f"note: skipping {p}: no result.json in it or its subfolders")
            files += found
    if not files:
        raise FileNotFoundError(f"no result.json in {', '.join(map(str, paths))} or their subfolders (run "
                                "`python -m experiments.lra.train` first; it writes RUN_DIR/result.json at the end)")
    return [_read_result(f) for f in files]


def _read_result(f: Path) -> dict:
    res = json.loads(f.read_text())
    missing = [k for k in ("task", "model", "preset", "test_acc") if k not in res]
    if missing:
        raise ValueError(f"{f}: not an LRA result file (missing {missing})")
    res["path"] = str(f.parent)
    return res


def _fmt(value: float | None) -> str:
    return "fail" if value is None else f"{value:.2f}"


def _average(values: list[float | None]) -> float:
    return sum(50.0 if v is None else v for v in values) / len(values)


def _rank(res: dict) -> tuple[bool, int]:
    """Order of preference among runs of one (model, preset, task): finished first, then most steps."""
    return bool(res.get("completed")), int(res.get("steps") or 0)


def _state(res: dict) -> str:
    steps = res.get("steps", "?")
    if res.get("completed"):
        return f"completed, {steps} steps"
    return f"unfinished, stopped at step {steps}" if "completed" in res else f"{steps} steps, completion not recorded"


def choose_runs(results: list[dict]) -> tuple[dict[tuple[str, str], dict[str, dict]], list[str]]:
    """The run behind each headline cell: per (model, preset, task) the finished run with the most
    steps (ties: the later argument); an unfinished run only when no finished one exists.

    Returns {(model, preset): {task: result}} and one note per cell that had a choice to make or
    holds an unfinished run, naming the run chosen and the ones left out.
    """
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for res in results:
        groups.setdefault((res["model"], res["preset"], res["task"]), []).append(res)
    chosen: dict[tuple[str, str], dict[str, dict]] = {}
    notes = []
    for (model, preset, task), runs in groups.items():
        best = max(reversed(runs), key=_rank)  # reversed: max keeps the first of equals, i.e. the later run
        chosen.setdefault((model, preset), {})[task] = best
        others = [r for r in runs if r is not best]
        if others or not best.get("completed"):
            left = "; left out: " + ", ".join(f"{r['path']} ({_state(r)})" for r in others) if others else ""
            flag = "" if best.get("completed") else " -- NOT a finished run (marked * in the table)"
            notes.append(f"{MODEL_LABELS.get(model, model)} ({preset}) {task}: {best['path']} "
                         f"({_state(best)}){flag}{left}")
    return chosen, notes


def markdown_table(results: list[dict], *, published: bool = True) -> str:
    """One row per published model, then one per (model, preset) measured; cells are test acc %.

    Each measured cell is the run `choose_runs` picks; an unfinished run's cell carries a `*`, and
    the notes under the table say which run each cell with a choice came from.
    """
    header = "| model | " + " | ".join(name for _, name in TASK_COLUMNS) + " | Avg |"
    lines = [header, "|" + "---|" * (len(TASK_COLUMNS) + 2)]
    if published:
        for name, accs in PUBLISHED.items():
            lines.append(f"| {name} (published) | " + " | ".join(map(_fmt, accs)) + f" | {_average(list(accs)):.2f} |")
    chosen, notes = choose_runs(results)
    for (model, preset), runs in chosen.items():
        accs = {t: 100.0 * r["test_acc"] for t, r in runs.items()}
        cells = [(_fmt(accs[t]) + ("" if runs[t].get("completed") else "*")) if t in accs else "-"
                 for t, _ in TASK_COLUMNS]
        avg = f"{_average([accs[t] for t, _ in TASK_COLUMNS]):.2f}" if len(accs) == len(TASK_COLUMNS) else "-"
        lines.append(f"| {MODEL_LABELS.get(model, model)} ({preset}, this repo) | " + " | ".join(cells) + f" | {avg} |")
    if notes:
        lines += ["", "Runs behind the cells above (finished runs first, then the most steps):", ""]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def runs_table(results: list[dict]) -> str:
    """Per-run details: what each measured number is (steps, time, majority rate, completion)."""
    lines = ["| run | task | model | preset | test acc | majority | best val | mean length | steps | train time "
             "| complete |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        maj = f"{100 * r['majority_rate']:.2f}" if "majority_rate" in r else "-"
        val = f"{100 * r['best_val_acc']:.2f}" if "best_val_acc" in r else "-"
        secs = f"{r['train_seconds'] / 60:.1f} min" if "train_seconds" in r else "-"
        mean_len = f"{r['test_mean_len']:.0f}" if "test_mean_len" in r else "-"
        lines.append(f"| {Path(r['path']).name} | {r['task']} | {r['model']} | {r['preset']} | "
                     f"{100 * r['test_acc']:.2f} | {maj} | {val} | {mean_len} | {r.get('steps', '-')} | {secs} | "
                     f"{'yes' if r.get('completed') else 'no'} |")
    return "\n".join(lines)


def _curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of validation accuracy and loss and training loss from metrics.jsonl."""
    series = {"val_acc": [], "val_loss": [], "train_loss": []}
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("split") == "val":
            series["val_acc"].append((r["step"], 100.0 * r["acc"]))
            series["val_loss"].append((r["step"], r["loss"]))
        elif r.get("split") == "train":
            series["train_loss"].append((r["step"], r["loss"]))
    return series


def plot_run(result: dict) -> Path | None:
    """Write RUN_DIR/curves.png (validation accuracy and loss against step); None without metrics."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    folder = Path(result["path"])
    s = _curves(folder)
    if not s["val_acc"] and not s["train_loss"]:
        return None
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    if s["val_acc"]:
        ax_acc.plot(*zip(*s["val_acc"]), marker="o", ms=3, label="validation")
        ax_loss.plot(*zip(*s["val_loss"]), marker="o", ms=3, label="validation")
    if s["train_loss"]:
        ax_loss.plot(*zip(*s["train_loss"]), alpha=0.4, lw=1, label="train")
    if "majority_rate" in result:
        ax_acc.axhline(100.0 * result["majority_rate"], color="gray", ls=":", label="majority class (test)")
    ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="validation accuracy")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['task']} / {result['model']} ({result['preset']}): {folder.name}")
    fig.tight_layout()
    out = folder / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m experiments.lra.report",
                                description="Markdown table of LRA test accuracies next to the published numbers.")
    p.add_argument("runs", nargs="+", help="run folders (with result.json) or folders of run folders")
    p.add_argument("--no-published", action="store_true", help="leave out the published rows")
    p.add_argument("--no-plots", action="store_true", help="do not write RUN_DIR/curves.png")
    args = p.parse_args(argv)
    results = find_results(args.runs)
    if not args.no_plots:
        for res in results:
            png = plot_run(res)
            if png is not None:
                print(f"wrote {png}", file=sys.stderr)
    text = (markdown_table(results, published=not args.no_published)
            + "\n\nTest accuracy in %. Rows from a preset other than `paper` ran on reduced settings (shorter "
              "sequences, smaller models; see the mean test length below) and are not comparable with the "
              "published numbers. Runs:\n\n" + runs_table(results))
    print(text)
    return text


if __name__ == "__main__":
    main()
