"""The LRA quick start: `python -m experiments.lra.quickstart [--out DIR]`.

1. Generates a small ListOps set with the library's generator (procedure in `docs/lra.md`, shorter
   sequences than the benchmark's 500-2000 tokens so that it trains on a CPU),
2. trains S4D with `--preset cpu-small` (about five minutes on 2 CPU cores),
3. trains the Transformer with the same preset for comparison,
4. prints test accuracy next to the README's (`EXPECTED_ACC`, with the difference; one outside
   `SPREAD` points is flagged) and the majority-class rate of the test split.
Each model is an ordinary `experiments.lra.train` run in `DIR/<model>` (metrics.jsonl, checkpoints,
result.json), so `python -m experiments.lra.report DIR` tabulates them too. Config overrides
(`--model.d_model=32`, `--train.epochs=2`, ...) are passed on to both training runs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from experiments.lra import train
from experiments.lra.data import listops
from experiments.lra.overrides import split_overrides

# The quick-start data: sizes and token lengths (the benchmark uses 96k/2k/2k and 500-2000).
N_TRAIN, N_VAL, N_TEST = 16000, 1000, 1000
MIN_LENGTH, MAX_LENGTH = 20, 100
DATA_SEED = 0
# Test accuracy (%) the README's quick-start table reports for each model (the one copy in code; a
# test checks the README against it), and the difference from it that counts as expected: about two
# binomial standard deviations of a 1,000-example test set at 50% accuracy (1.6 points each), which
# covers other CPUs, thread counts and library versions.
EXPECTED_ACC = {"s4d": 55.40, "transformer": 43.10, "mamba2": 42.60}
SPREAD = 3.0


def generate_data(root: Path, n: tuple[int, int, int] | None = None) -> Path:
    """Write the quick-start ListOps split in the release layout under `root` (reused if present).

    `n`: (train, val, test) sizes, default `N_TRAIN, N_VAL, N_TEST`. Every sequence is shorter than
    `MAX_LENGTH` tokens, within the cpu-small preset's length, so none is truncated.
    """
    n_train, n_val, n_test = n or (N_TRAIN, N_VAL, N_TEST)
    folder = root / listops.FOLDER
    stamp = {"n": [n_train, n_val, n_test], "length": [MIN_LENGTH, MAX_LENGTH], "seed": DATA_SEED}
    stamp_file = root / "quickstart-data.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and all(
            (folder / listops.SPLIT_FILES[s]).is_file() for s in ("train", "val", "test")):
        print(f"[quickstart] reusing ListOps data in {folder}", flush=True)
        return root
    from tqdm.auto import tqdm

    with tqdm(total=n_train + n_val + n_test, desc="generating ListOps", dynamic_ncols=True) as bar:
        splits = listops.generate_splits(n_train, n_val, n_test, seed=DATA_SEED, min_length=MIN_LENGTH,
                                         max_length=MAX_LENGTH, progress=bar.update)
    listops.write_splits(root, splits)
    stamp_file.write_text(json.dumps(stamp))
    return root


def compare(model: str, acc: float) -> str:
    """`README | difference` cells: the README's accuracy for `model` and acc minus it, flagged
    (`OUTSIDE +-SPREAD`) only when it lies outside the stated spread."""
    if model not in EXPECTED_ACC:
        return "- | -"
    diff = acc - EXPECTED_ACC[model]
    flag = f" OUTSIDE +-{SPREAD:g}" if abs(diff) > SPREAD else ""
    return f"{EXPECTED_ACC[model]:.2f}% | {diff:+.2f}{flag}"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m experiments.lra.quickstart", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--out", type=Path, default=Path("runs/lra-quickstart"),
                   help="output folder: data/ plus one run folder per model (run folders are replaced)")
    p.add_argument("--models", nargs="+", default=["s4d", "transformer"], choices=["s4d", "s4", "transformer", "mamba", "mamba2"])
    p.add_argument("--max-steps", type=int, default=None, help="cap on training steps per model (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(rest)

    data_dir = generate_data(args.out / "data")
    results = []
    for model in args.models:
        run_dir = args.out / model
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cli = ["--task", "listops", "--model", model, "--data-dir", str(data_dir), "--preset", "cpu-small",
               "--out", str(run_dir), "--seed", str(args.seed)]
        if args.max_steps is not None:
            cli += ["--max-steps", str(args.max_steps)]
        cli += [f"--{key}={value}" for key, value in overrides.items()]
        print(f"\n[quickstart] python -m experiments.lra.train {' '.join(cli)}", flush=True)
        t0 = time.perf_counter()
        res = train.main(cli)
        if res.get("interrupted"):
            print(f"[quickstart] interrupted; continue with: python -m experiments.lra.train {' '.join(cli)} --resume")
            sys.exit(130)
        res["wall_seconds"] = time.perf_counter() - t0
        results.append(res)

    lines = ["", "ListOps quick start (generated, "
             f"{N_TRAIN}/{N_VAL}/{N_TEST} examples, {MIN_LENGTH}-{MAX_LENGTH} tokens), preset cpu-small:", "",
             "| model | test accuracy | README | difference | majority class | params | steps | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {100 * r['test_acc']:.2f}% | {compare(r['model'], 100 * r['test_acc'])} | "
                     f"{100 * r['majority_rate']:.2f}% | {r['n_params']:,} | {r['steps']} | "
                     f"{r['wall_seconds'] / 60:.1f} min |")
    lines += ["", f"README: the accuracy the README reports for this command; a difference beyond +-{SPREAD:g} "
                  "points is flagged (runs with other overrides or --max-steps are not comparable)."]
    text = "\n".join(lines)
    print(text, flush=True)
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps(
        [{k: r[k] for k in ("model", "test_acc", "majority_rate", "n_params", "steps", "wall_seconds")}
         for r in results], indent=2))
    return results


if __name__ == "__main__":
    main()
