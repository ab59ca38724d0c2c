"""Markdown table of LRA test accuracies next to the published numbers (SPEC section 6).

`python -m experiments.lra.report RUN_DIR...` reads each run's `result.json` (written by
`experiments.lra.train`; a folder without one is searched one level down, so the quick start's
output folder works as is) and prints one row per (model, preset) with the six task columns, next
to the published rows. The average follows the LRA convention (Path-X failure counts as 50) and is
only given for rows that have all six tasks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK_COLUMNS = (("listops", "ListOps"), ("text", "Text"), ("retrieval", "Retrieval"), ("image", "Image"),
                ("pathfinder", "Pathfinder"), ("pathx", "Path-X"))
# SPEC section 6; None = failed (counts as 50 in the average).
PUBLISHED = {
    "Transformer (LRA paper)": (36.37, 64.27, 57.46, 42.44, 71.40, None),
    "S4 (updated, LegS)": (59.60, 86.82, 90.90, 88.65, 94.20, 96.35),
    "S4D-LegS": (60.47, 86.18, 89.46, 88.19, 93.06, 91.95),
    "S5": (62.15, 89.31, 91.40, 88.00, 95.33, 98.58),
    "Mega": (63.14, 90.43, 91.25, 90.44, 96.01, 97.98),
}
MODEL_LABELS = {"s4": "S4", "s4d": "S4D", "transformer": "Transformer"}


def find_results(paths: list[str | Path]) -> list[dict]:
    """The `result.json` of each run folder (or of its immediate subfolders)."""
    results = []
    for p in map(Path, paths):
        if p.is_file():
            files = [p]
        elif (p / "result.json").is_file():
            files = [p / "result.json"]
        else:
            files = sorted(p.glob("*/result.json"))
        if not files:
            raise FileNotFoundError(f"no result.json in {p} or its subfolders (run `python -m experiments.lra.train` "
                                    f"first; it writes RUN_DIR/result.json at the end)")
        for f in files:
            res = json.loads(f.read_text())
            missing = [k for k in ("task", "model", "preset", "test_acc") if k not in res]
            if missing:
                raise ValueError(f"{f}: not an LRA result file (missing {missing})")
            res["path"] = str(f.parent)
            results.append(res)
    return results


def _fmt(value: float | None) -> str:
    return "fail" if value is None else f"{value:.2f}"


def _average(values: list[float | None]) -> float:
    return sum(50.0 if v is None else v for v in values) / len(values)


def markdown_table(results: list[dict], *, published: bool = True) -> str:
    """One row per published model, then one per (model, preset) measured; cells are test acc %."""
    header = "| model | " + " | ".join(name for _, name in TASK_COLUMNS) + " | Avg |"
    lines = [header, "|" + "---|" * (len(TASK_COLUMNS) + 2)]
    if published:
        for name, accs in PUBLISHED.items():
            lines.append(f"| {name} (published) | " + " | ".join(map(_fmt, accs)) + f" | {_average(list(accs)):.2f} |")
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for res in results:
        # A later run of the same (model, preset, task) replaces an earlier one in the table.
        rows.setdefault((res["model"], res["preset"]), {})[res["task"]] = 100.0 * res["test_acc"]
    for (model, preset), accs in rows.items():
        cells = [_fmt(accs[t]) if t in accs else "-" for t, _ in TASK_COLUMNS]
        avg = f"{_average([accs[t] for t, _ in TASK_COLUMNS]):.2f}" if len(accs) == len(TASK_COLUMNS) else "-"
        lines.append(f"| {MODEL_LABELS.get(model, model)} ({preset}, this repo) | " + " | ".join(cells) + f" | {avg} |")
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


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m experiments.lra.report",
                                description="Markdown table of LRA test accuracies next to the published numbers.")
    p.add_argument("runs", nargs="+", help="run folders (with result.json) or folders of run folders")
    p.add_argument("--no-published", action="store_true", help="leave out the published rows")
    args = p.parse_args(argv)
    results = find_results(args.runs)
    text = (markdown_table(results, published=not args.no_published)
            + "\n\nTest accuracy in %. Rows from a preset other than `paper` ran on reduced settings (shorter "
              "sequences, smaller models; see the mean test length below) and are not comparable with the "
              "published numbers. Runs:\n\n" + runs_table(results))
    print(text)
    return text


if __name__ == "__main__":
    main()
