"""Tiny files in every official LRA layout (`docs/lra.md`), for tests and smoke runs.

`write_fixtures(root, task)` writes a few examples of one task into `root` in exactly the format
the real data comes in (ListOps TSV with header, AAN TSV without header, aclImdb folders,
CIFAR-10 python pickles, Pathfinder PNGs with text `.npy` metadata) and returns the folder to
pass as `data_dir` to `experiments.lra.data.load_task`. Content is deterministic and small
(sequences of tens to hundreds of tokens), so a training step on it takes well under a second.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np

from experiments.lra.data import listops

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
N_PER_SPLIT = 8          # items per split for the TSV / folder tasks
N_CIFAR_PER_BATCH = 4    # 5 train batches -> 20 train images (18 train / 2 val), 4 test
N_PATHFINDER = 40        # images incl. one 0-byte file -> 39 readable (31 / 4 / 4 after 80/10/10)

_WORDS = ("state", "space", "model", "long", "range", "arena", "sequence", "kernel", "filter",
          "great", "awful", "movie", "plot", "naïve", "café", "—", "<br />", "!", "?")


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def _listops(root: Path) -> None:
    splits = listops.generate_splits(N_PER_SPLIT, N_PER_SPLIT, N_PER_SPLIT, seed=1234,
                                     min_length=10, max_length=120)
    folder = listops.write_splits(root, splits)
    # The original release writes parenthesized trees; make the first train line look like that.
    path = folder / listops.SPLIT_FILES["train"]
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] = "( ( ( [MAX 2 ) 9 ) ( ( [MIN 4 ) 7 ) ] ) ]\t9"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _text(root: Path) -> None:
    rng = random.Random(5)
    for split in ("train", "test"):
        for polarity, label in (("pos", 1), ("neg", 0)):
            folder = root / "aclImdb" / split / polarity
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(N_PER_SPLIT // 2):
                rating = rng.randint(7, 10) if label else rng.randint(1, 4)
                text = _sentence(rng, rng.randint(5, 60))
                (folder / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")


def _retrieval(root: Path) -> None:
    rng = random.Random(6)
    folder = root / "tsv_data"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval", "test"):
        with open(folder / f"new_aan_pairs.{split}.tsv", "w", encoding="utf-8", newline="\n") as f:
            for i in range(N_PER_SPLIT):
                label = i % 2
                id1, id2 = f"P{rng.randint(0, 99):02d}-{i}", f"Q{rng.randint(0, 99):02d}-{i}"
                f.write(f"{label}\t{id1}\t{id2}\t{_sentence(rng, rng.randint(3, 40))}\t"
                        f"{_sentence(rng, rng.randint(3, 40))}\n")


def _cifar(root: Path) -> None:
    rng = np.random.default_rng(7)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = rng.integers(0, 256, size=(N_CIFAR_PER_BATCH, 3072), dtype=np.uint8)
        labels = [int((k * N_CIFAR_PER_BATCH + i) % 10) for i in range(N_CIFAR_PER_BATCH)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{k}_{i}.png".encode() for i in range(N_CIFAR_PER_BATCH)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    meta = {b"label_names": [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer",
                                                  "dog", "frog", "horse", "ship", "truck")],
            b"num_cases_per_batch": N_CIFAR_PER_BATCH, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)


def _pathfinder(root: Path, resolution: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(8 + resolution)
    base = root / f"pathfinder{resolution}" / "curv_contour_length_14"
    (base / "metadata").mkdir(parents=True, exist_ok=True)
    lines = []
    per_folder = N_PATHFINDER // 2
    for k in range(N_PATHFINDER):
        b = k // per_folder
        img_dir = base / "imgs" / str(b)
        img_dir.mkdir(parents=True, exist_ok=True)
        label = k % 2
        name = f"sample_{k}.png"
        if k == 3:
            # The real pathfinder32 release contains a 0-byte PNG; the reader must skip it.
            (img_dir / name).write_bytes(b"")
        else:
            pixels = (rng.random((resolution, resolution)) < 0.05) * 255
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(img_dir / name)
        lines.append((b, f"imgs/{b} {name} {k} {label} 14 2 5\n"))
    for b in sorted({b for b, _ in lines}):
        (base / "metadata" / f"{b}.npy").write_text("".join(l for bb, l in lines if bb == b))


def write_fixtures(root: str | Path, task: str) -> Path:
    """Write tiny official-format files for `task` under `root`; return the data_dir to load from."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if task == "listops":
        _listops(root)
    elif task == "text":
        _text(root)
    elif task == "retrieval":
        _retrieval(root)
    elif task == "image":
        _cifar(root)
    else:
        _pathfinder(root, 32 if task == "pathfinder" else 128)
    return root
