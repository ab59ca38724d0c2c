"""Generate the synthetic LRA tasks in the original release layout (`docs/lra.md`).

    python -m experiments.lra.data.generate listops --out DIR --n-train N --n-val N --n-test N --seed S
        [--min-length 500 --max-length 2000]
    python -m experiments.lra.data.generate pathfinder --out DIR --resolution 32|64|128
        --contour-length 6|9|14 --n N --seed S [--workers K] [--sample-sheet PATH]

ListOps writes `DIR/listops-1000/basic_{train,val,test}.tsv`; Pathfinder writes
`DIR/pathfinder{res}/{curv_baseline|curv_contour_length_9|curv_contour_length_14}/imgs/<b>/sample_<k>.png`
with text `metadata/<b>.npy`. Output depends only on the seed (not on --workers): image i is
drawn from its own generator seeded with (seed, i). `experiments.lra.data.load_task` reads both.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

from experiments.lra.data import listops, pathfinder
from experiments.lra.data import PATHFINDER_FOLDERS

CHUNK = 50  # images per worker task


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr)


def run_listops(args) -> Path:
    bar = _progress(args.n_train + args.n_val + args.n_test, "listops")
    splits = listops.generate_splits(args.n_train, args.n_val, args.n_test, seed=args.seed,
                                     min_length=args.min_length, max_length=args.max_length,
                                     progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    folder = listops.write_splits(args.out, splits)
    print(f"wrote {sum(len(v) for v in splits.values())} ListOps examples to {folder}")
    return folder


def _pathfinder_chunk(job):
    """Draw and save images [start, stop); return their metadata lines in order."""
    cfg, seed, start, stop, per_folder, base = job
    from PIL import Image

    lines = []
    for i in range(start, stop):
        pixels, label, _ = pathfinder.generate_sample(cfg, pathfinder.image_rng(seed, i))
        b, k = divmod(i, per_folder)
        folder = Path(base) / "imgs" / str(b)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(folder / f"sample_{k}.png")
        lines.append((b, f"imgs/{b} sample_{k}.png {k} {label} {cfg.contour_length} "
                         f"{cfg.paddle_length:g} {cfg.distractors}\n"))
    return stop - start, lines


def pathfinder_folder(out: str | Path, resolution: int, contour_length: int) -> Path:
    return Path(out) / f"pathfinder{resolution}" / PATHFINDER_FOLDERS[contour_length]


def run_pathfinder(args) -> Path:
    cfg = pathfinder.preset(args.resolution, args.contour_length)
    base = pathfinder_folder(args.out, args.resolution, args.contour_length)
    (base / "metadata").mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, args.seed, s, min(s + CHUNK, args.n), args.per_folder, str(base))
            for s in range(0, args.n, CHUNK)]
    bar = _progress(args.n, f"pathfinder{args.resolution}")
    by_folder: dict[int, list[str]] = {}
    if args.workers > 1:
        pool = multiprocessing.Pool(args.workers)
        results = pool.imap(_pathfinder_chunk, jobs)
    else:
        pool, results = None, map(_pathfinder_chunk, jobs)
    try:
        for n_done, lines in results:
            for b, line in lines:
                by_folder.setdefault(b, []).append(line)
            if bar is not None:
                bar.update(n_done)
    except BaseException:
        if pool is not None:
            pool.terminate()  # Ctrl-C: stop the workers now instead of draining their queue
        raise
    else:
        if pool is not None:
            pool.close()
    finally:
        if pool is not None:
            pool.join()
        if bar is not None:
            bar.close()
    for b, lines in by_folder.items():
        (base / "metadata" / f"{b}.npy").write_text("".join(lines))
    if args.sample_sheet:
        write_sample_sheet(cfg, args.seed, args.sample_sheet)
    print(f"wrote {args.n} Pathfinder images ({args.resolution} px, contour length "
          f"{args.contour_length}) to {base}")
    return base


def write_sample_sheet(cfg, seed: int, path: str | Path, *, n: int = 16, cols: int = 8) -> Path:
    """A grid of the first `n` images (upscaled to ~128 px), each with a label strip under it."""
    from PIL import Image, ImageDraw

    scale = max(1, 128 // cfg.resolution)
    size, pad, strip = cfg.resolution * scale, 4, 12
    rows = (n + cols - 1) // cols
    sheet = Image.new("L", (cols * (size + pad) + pad, rows * (size + pad + strip) + pad), 60)
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        pixels, label, _ = pathfinder.generate_sample(cfg, pathfinder.image_rng(seed, i))
        x = pad + (i % cols) * (size + pad)
        y = pad + (i // cols) * (size + pad + strip)
        sheet.paste(Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST), (x, y))
        draw.text((x + 2, y + size), f"#{i} label {label}", fill=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.lra.data.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    lo = sub.add_parser("listops", help="ListOps expressions -> listops-1000/basic_*.tsv")
    lo.add_argument("--out", required=True, help="data directory to write into")
    lo.add_argument("--n-train", type=int, default=96000)
    lo.add_argument("--n-val", type=int, default=2000)
    lo.add_argument("--n-test", type=int, default=2000)
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--min-length", type=int, default=500, help="keep trees longer than this (tokens)")
    lo.add_argument("--max-length", type=int, default=2000, help="keep trees shorter than this (tokens)")
    pf = sub.add_parser("pathfinder", help="Pathfinder / Path-X images -> pathfinderNN/...")
    pf.add_argument("--out", required=True, help="data directory to write into")
    pf.add_argument("--resolution", type=int, choices=(32, 64, 128), default=32)
    pf.add_argument("--contour-length", type=int, choices=(6, 9, 14), default=14)
    pf.add_argument("--n", type=int, required=True, help="number of images")
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--workers", type=int, default=1, help="processes drawing images")
    pf.add_argument("--per-folder", type=int, default=1000, help="images per imgs/<b> subfolder")
    pf.add_argument("--sample-sheet", default=None, help="also save a PNG grid of the first 16 images")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.task == "listops":
        for name in ("n_train", "n_val", "n_test"):
            if getattr(args, name) < 0:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
        run_listops(args)
    else:
        if args.n < 1 or args.workers < 1 or args.per_folder < 1:
            raise SystemExit("--n, --workers and --per-folder must be >= 1")
        run_pathfinder(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
