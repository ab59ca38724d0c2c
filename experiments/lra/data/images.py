"""Readers of the LRA image tasks: CIFAR-10 in gray (python pickles or a saved `datasets` dataset)
and Pathfinder / Path-X (PNG files listed by text `.npy` metadata). Formats: `docs/lra.md`."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from experiments.lra.data.common import TokenDataset, checked, load_from_disk, locate, log, missing_error, utf8_lines

PATHFINDER_SPLIT_SEED = 0
PATHFINDER_FOLDERS = {6: "curv_baseline", 9: "curv_contour_length_9", 14: "curv_contour_length_14"}


def gray(rgb: np.ndarray) -> np.ndarray:
    """(n, 3, 32, 32) uint8 -> (n, 1024) uint8 gray pixels, rounded."""
    r, g, b = (rgb[:, c].astype(np.float64) for c in range(3))
    gray = np.rint(0.2989 * r + 0.5870 * g + 0.1140 * b)  # (n, 32, 32)
    return np.clip(gray, 0, 255).astype(np.uint8).reshape(len(rgb), -1)


def read_image(data_dir: Path, max_len: int) -> dict[str, Dataset]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = locate(data_dir, "cifar-10-batches-py", "test_batch")
    if folder is not None:
        parts = {}
        for name in names:
            path = folder / name
            if not path.exists():
                raise missing_error("image", data_dir, [f"cifar-10-batches-py/{n}" for n in names])
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = np.asarray(batch[b"labels"], dtype=np.int64)
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
                raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
            parts[name] = (gray(data), labels)
        train_x = np.concatenate([parts[n][0] for n in names[:5]])  # (50000, 1024)
        train_y = np.concatenate([parts[n][1] for n in names[:5]])
        test_x, test_y = parts["test_batch"]
        sources = {"train": folder / "data_batch_{1..5}", "val": folder / "data_batch_5",
                   "test": folder / "test_batch"}
    elif (data_dir / "cifar10" / "dataset_dict.json").exists():
        ds = load_from_disk(data_dir / "cifar10")
        conv = {}
        for s in ("train", "test"):
            img_col = "img" if "img" in ds[s].column_names else "image"
            rgb = np.stack([np.asarray(im.convert("RGB")).transpose(2, 0, 1) for im in ds[s][img_col]])
            conv[s] = (gray(rgb), np.asarray(ds[s]["label"], dtype=np.int64))
        (train_x, train_y), (test_x, test_y) = conv["train"], conv["test"]
        sources = {"train": data_dir / "cifar10" / "train", "val": data_dir / "cifar10" / "train",
                   "test": data_dir / "cifar10" / "test"}
    else:
        raise missing_error("image", data_dir, [f"cifar-10-batches-py/{n}" for n in names]
                       + ["or cifar10/ (datasets.save_to_disk)"])
    n_val = len(train_x) // 10  # 5k of 50k: the last tenth of the training batches
    n_train = len(train_x) - n_val

    def make(split, x, y):
        ds = TokenDataset([row[:max_len] for row in x], y.tolist(), sources[split])
        return checked("image", split, ds, [x.shape[1]] * len(x), max_len)
    return {"train": make("train", train_x[:n_train], train_y[:n_train]),
            "val": make("val", train_x[n_train:], train_y[n_train:]), "test": make("test", test_x, test_y)}


def decode_png(path: Path, resolution: int) -> np.ndarray:
    """Fully decode one Pathfinder image to (resolution, resolution) uint8 gray values.

    A truncated or corrupt file (which `Image.open` accepts: it reads only the header) or one of
    another size is a ValueError naming the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("L"), dtype=np.uint8)  # (res, res); convert decodes every row
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated / corrupt data
        raise ValueError(f"{path}: not a readable PNG image ({type(e).__name__}: {e})") from None
    if pixels.shape != (resolution, resolution):
        raise ValueError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected {resolution}x{resolution}")
    return pixels


class PathfinderDataset(Dataset):
    """Pathfinder PNGs read lazily; items are (LongTensor (res*res,) gray values, int label)."""

    def __init__(self, paths: list[Path], labels: list[int], resolution: int, max_len: int, source: str | Path = "?"):
        self.paths, self.labels = paths, labels
        self.resolution, self.max_len = resolution, max_len
        self.source, self.truncated = str(source), (0, 0, 0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        pixels = decode_png(self.paths[i], self.resolution)  # (res, res)
        return torch.from_numpy(pixels.reshape(-1)[:self.max_len].astype(np.int64)), self.labels[i]


def read_pathfinder(task: str, data_dir: Path, max_len: int, resolution: int,
                     contour_length: int) -> dict[str, Dataset]:
    if contour_length not in PATHFINDER_FOLDERS:
        raise ValueError(f"contour_length must be one of {sorted(PATHFINDER_FOLDERS)}, got {contour_length}")
    sub = PATHFINDER_FOLDERS[contour_length]
    base = data_dir / f"pathfinder{resolution}" / sub
    if not (base / "metadata").is_dir():
        base = data_dir / sub if (data_dir / sub / "metadata").is_dir() else base
    meta_files = sorted((base / "metadata").glob("*.npy"), key=lambda p: (len(p.stem), p.stem)) \
        if (base / "metadata").is_dir() else []
    if not meta_files:
        raise missing_error(task, data_dir, [f"pathfinder{resolution}/{sub}/metadata/<b>.npy",
                                        f"pathfinder{resolution}/{sub}/imgs/<b>/sample_<k>.png"])
    paths, labels, skipped = [], [], 0
    for meta in meta_files:
        for lineno, line in utf8_lines(meta):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) < 4:
                    raise ValueError(f"expected >= 4 space-separated fields, got {len(fields)}")
                label = int(fields[3])
                if label not in (0, 1):
                    raise ValueError(f"label {label} is not 0 or 1")
            except ValueError as e:
                raise ValueError(f"{meta}, line {lineno}: malformed Pathfinder metadata ({e})") from None
            path = base / fields[0] / fields[1]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise FileNotFoundError(f"{meta}, line {lineno}: image {path} does not exist") from None
            if size == 0:
                skipped += 1
                continue
            # Decoded once here, so a damaged file stops the run before training, by name, instead
            # of ending an epoch hours in.
            decode_png(path, resolution)
            paths.append(path)
            labels.append(label)
    if skipped:
        log.warning("LRA %s: skipped %d empty (0-byte) image(s) under %s", task, skipped, base)
    order = np.random.default_rng(PATHFINDER_SPLIT_SEED).permutation(len(paths))
    n_train, n_val = int(0.8 * len(paths)), int(0.1 * len(paths))
    cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    out = {}
    for s, idx in cuts.items():
        ds = PathfinderDataset([paths[i] for i in idx], [labels[i] for i in idx], resolution, max_len,
                               f"{base / 'metadata'}/*.npy ({s}: {len(idx)} of {len(paths)} readable images)")
        ds.n_skipped = skipped
        out[s] = checked(task, s, ds, [resolution * resolution] * len(idx), max_len)
    return out

