"""Long Range Arena data: readers for the original release layouts, datasets and batching.

The tasks, their files and their tokenization are described in `docs/lra.md`; the per-task facts
(classes, vocabulary, full length) live in one table, `experiments.lra.tasks`.

`load_task(task, data_dir)` reads one task from the folder layout the data ships in and returns
`{"train", "val", "test"}` datasets whose items are `(ids, label)`:

- ListOps: `listops-1000/basic_{train,val,test}.tsv`, header `Source\\tTarget`. Tokens: pad 0,
  digits 0-9 -> 1..10, `[MIN [MAX [MED [SM` -> 11..14, `]` -> 15 (vocab 16); the parentheses of the
  original release carry no information and are dropped.
- Text: IMDB `aclImdb/{train,test}/{pos,neg}/*.txt` or a `datasets` DatasetDict saved to
  `imdb/` (`save_to_disk`); test doubles as val. Tokens: UTF-8 byte + 1, pad 0 (vocab 257).
- Retrieval: AAN `tsv_data/new_aan_pairs.{train,eval,test}.tsv`, no header, columns
  `label id1 id2 text1 text2`; items are (2, L_i) byte tokens (the shorter one padded with 0).
- Image: CIFAR-10 `cifar-10-batches-py/` pickles (or a saved `datasets` dataset in `cifar10/`),
  gray = round(0.2989 R + 0.5870 G + 0.1140 B); the last 10% of train (5k of 50k) is val.
- Pathfinder / Path-X: `pathfinder{32,128}/curv_contour_length_14/imgs/<b>/sample_<k>.png` with
  text `metadata/<b>.npy` (field 0 folder, 1 file, 3 label); split 80/10/10 after a fixed-seed
  shuffle; 0-byte images are skipped, counted and reported with a logged warning.
Pixel tasks use the raw values 0..255 as ids (vocab 256); all their sequences have full length.

Every split must hold at least one example (else a ValueError naming the file or folder); text
that is not UTF-8 is a ValueError naming file and line; sequences cut to `max_len` are counted and
reported once per split (a logged warning: how many, from what length to what). Each dataset
carries `source` (the file or folder it came from), `truncated` (count, longest original
length, `max_len`) and `longest` (its longest sequence after truncation; per document for Retrieval).
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from experiments.lra.tasks import task as task_facts

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LISTOPS_VOCAB = {**{str(d): d + 1 for d in range(10)}, "[MIN": 11, "[MAX": 12, "[MED": 13, "[SM": 14, "]": 15}
PATHFINDER_SPLIT_SEED = 0
PATHFINDER_FOLDERS = {6: "curv_baseline", 9: "curv_contour_length_9", 14: "curv_contour_length_14"}


def _generate_hint(task: str) -> str:
    return {
        "listops": "generate it with: python -m experiments.lra.generate listops --out DATA_DIR "
                   "--n-train 96000 --n-val 2000 --n-test 2000 --seed 0",
        "pathfinder": "generate it with: python -m experiments.lra.generate pathfinder --out DATA_DIR "
                      "--resolution 32 --contour-length 14 --n 200000 --seed 0 --workers 8",
        "pathx": "generate it with: python -m experiments.lra.generate pathfinder --out DATA_DIR "
                 "--resolution 128 --contour-length 14 --n 200000 --seed 0 --workers 8",
        "retrieval": "download the LRA release (lra_release.gz from the google-research/long-range-arena "
                     "repository) and point --data-dir at the folder holding tsv_data/",
        "text": "download https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz and extract it "
                "into DATA_DIR, or run: python -c \"import datasets; "
                "datasets.load_dataset('imdb').save_to_disk('DATA_DIR/imdb')\"",
        "image": "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into "
                 "DATA_DIR, or run: python -c \"import datasets; "
                 "datasets.load_dataset('cifar10').save_to_disk('DATA_DIR/cifar10')\"",
    }[task]


def _missing(task: str, data_dir: Path, expected: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"LRA {task}: no data under {data_dir}; expected {', '.join(expected)}. {_generate_hint(task)}")


def _locate(data_dir: Path, folder: str, probe: str) -> Path | None:
    """`data_dir/folder` if it holds `probe`, or `data_dir` itself if it does (pointed inside)."""
    for cand in (data_dir / folder, data_dir):
        if (cand / probe).exists():
            return cand
    return None


class TokenDataset(Dataset):
    """In-memory token sequences stored compactly; items are (LongTensor ids, int label)."""

    def __init__(self, seqs: list[np.ndarray], labels: list[int], source: str | Path = "?"):
        if len(seqs) != len(labels):
            raise ValueError(f"seqs and labels differ in length: {len(seqs)} vs {len(labels)}")
        self.seqs, self.labels = seqs, [int(y) for y in labels]
        self.source, self.truncated = str(source), (0, 0, 0)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.seqs[i].astype(np.int64)), self.labels[i]


def _checked(task: str, split: str, ds: Dataset, lengths: list[int], max_len: int) -> Dataset:
    """Refuse an empty split (naming its source); warn once if any example was cut to `max_len`.

    `lengths` are the examples' lengths before truncation (for Retrieval: the longer document).
    """
    if len(ds) == 0:
        raise ValueError(f"LRA {task} {split} split is empty: no examples in {ds.source}")
    cut = [n for n in lengths if n > max_len]
    ds.truncated = (len(cut), max(cut, default=0), max_len)
    ds.longest = min(max(lengths), max_len)
    if cut:
        log.warning("LRA %s %s: %d of %d examples truncated from up to %d (shortest cut: %d) to %d tokens "
                    "(data.max_len); source %s", task, split, len(cut), len(ds), max(cut), min(cut), max_len,
                    ds.source)
    return ds


def _utf8_lines(path: Path):
    """(line number, decoded line) of a text file; a non-UTF-8 line is a ValueError naming file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                 f"column {e.start + 1})") from None


def _bytes_tokens(text: str | bytes, max_len: int) -> np.ndarray:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(raw[:max_len], dtype=np.uint8).astype(np.int16) + 1  # (L_i,)


def _read_listops(data_dir: Path, max_len: int) -> dict[str, Dataset]:
    names = {s: f"basic_{s}.tsv" for s in SPLITS}
    folder = _locate(data_dir, "listops-1000", names["train"])
    if folder is None or not all((folder / n).exists() for n in names.values()):
        raise _missing("listops", data_dir, [f"listops-1000/{n}" for n in names.values()])
    out = {}
    for split, name in names.items():
        path = folder / name
        seqs, labels, lengths = [], [], []
        for lineno, line in _utf8_lines(path):
            line = line.rstrip("\r\n")
            if not line.strip() or (lineno == 1 and line.split("\t")[:2] == ["Source", "Target"]):
                continue
            fields = line.split("\t")
            try:
                if len(fields) != 2:
                    raise ValueError(f"expected 2 tab-separated fields, got {len(fields)}")
                label = int(fields[1])
                if not 0 <= label <= 9:
                    raise ValueError(f"label {label} outside 0..9")
                ids = [LISTOPS_VOCAB[t] for t in fields[0].split() if t not in ("(", ")")]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}, line {lineno}: malformed ListOps line ({e})") from None
            seqs.append(np.asarray(ids[:max_len], dtype=np.uint8))
            labels.append(label)
            lengths.append(len(ids))
        out[split] = _checked("listops", split, TokenDataset(seqs, labels, path), lengths, max_len)
    return out


def _read_retrieval(data_dir: Path, max_len: int) -> dict[str, Dataset]:
    names = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv",
             "test": "new_aan_pairs.test.tsv"}
    folder = _locate(data_dir, "tsv_data", names["train"])
    if folder is None or not all((folder / n).exists() for n in names.values()):
        raise _missing("retrieval", data_dir, [f"tsv_data/{n}" for n in names.values()])
    out = {}
    for split, name in names.items():
        path = folder / name
        seqs, labels, lengths = [], [], []
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                fields = line.split(b"\t")
                try:
                    if len(fields) != 5:
                        raise ValueError(f"expected 5 tab-separated fields (label id1 id2 text1 text2), "
                                         f"got {len(fields)}")
                    label = int(float(fields[0]))
                    if label not in (0, 1):
                        raise ValueError(f"label {fields[0].decode(errors='replace')} is not 0 or 1")
                except ValueError as e:
                    raise ValueError(f"{path}, line {lineno}: malformed AAN line ({e})") from None
                a, b = _bytes_tokens(fields[3], max_len), _bytes_tokens(fields[4], max_len)
                pair = np.zeros((2, max(len(a), len(b), 1)), dtype=np.int16)  # (2, L_i)
                pair[0, :len(a)], pair[1, :len(b)] = a, b
                seqs.append(pair)
                labels.append(label)
                lengths.append(max(len(fields[3]), len(fields[4])))
        out[split] = _checked("retrieval", split, TokenDataset(seqs, labels, path), lengths, max_len)
    return out


def _read_text(data_dir: Path, max_len: int) -> dict[str, Dataset]:
    folder = _locate(data_dir, "aclImdb", "train/pos")
    if folder is not None:
        splits = {}
        for split in ("train", "test"):
            seqs, labels, lengths = [], [], []
            for polarity, label in (("neg", 0), ("pos", 1)):
                sub = folder / split / polarity
                if not sub.is_dir():
                    raise _missing("text", data_dir, [f"aclImdb/{split}/{polarity}/*.txt"])
                for path in sorted(sub.glob("*.txt")):
                    raw = path.read_bytes()
                    seqs.append(_bytes_tokens(raw, max_len))
                    labels.append(label)
                    lengths.append(len(raw))
            ds = TokenDataset(seqs, labels, f"{folder / split}/{{neg,pos}}/*.txt")
            splits[split] = _checked("text", split, ds, lengths, max_len)
        return {"train": splits["train"], "val": splits["test"], "test": splits["test"]}
    if (data_dir / "imdb" / "dataset_dict.json").exists():
        ds = _load_from_disk(data_dir / "imdb")
        splits = {}
        for s in ("train", "test"):
            raw = [t.encode("utf-8") for t in ds[s]["text"]]
            tokens = TokenDataset([_bytes_tokens(t, max_len) for t in raw], ds[s]["label"], data_dir / "imdb" / s)
            splits[s] = _checked("text", s, tokens, [len(t) for t in raw], max_len)
        return {"train": splits["train"], "val": splits["test"], "test": splits["test"]}
    raise _missing("text", data_dir, ["aclImdb/{train,test}/{pos,neg}/*.txt",
                                      "or imdb/ (datasets.save_to_disk)"])


def _load_from_disk(path: Path):
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{path} is a saved `datasets` dataset; install the `datasets` package "
                          "(pip install 'ssmkit[experiments]') to read it") from e
    return datasets.load_from_disk(str(path))


def _gray(rgb: np.ndarray) -> np.ndarray:
    """(n, 3, 32, 32) uint8 -> (n, 1024) uint8 gray pixels, rounded."""
    r, g, b = (rgb[:, c].astype(np.float64) for c in range(3))
    gray = np.rint(0.2989 * r + 0.5870 * g + 0.1140 * b)  # (n, 32, 32)
    return np.clip(gray, 0, 255).astype(np.uint8).reshape(len(rgb), -1)


def _read_image(data_dir: Path, max_len: int) -> dict[str, Dataset]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = _locate(data_dir, "cifar-10-batches-py", "test_batch")
    if folder is not None:
        parts = {}
        for name in names:
            path = folder / name
            if not path.exists():
                raise _missing("image", data_dir, [f"cifar-10-batches-py/{n}" for n in names])
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = np.asarray(batch[b"labels"], dtype=np.int64)
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
                raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
            parts[name] = (_gray(data), labels)
        train_x = np.concatenate([parts[n][0] for n in names[:5]])  # (50000, 1024)
        train_y = np.concatenate([parts[n][1] for n in names[:5]])
        test_x, test_y = parts["test_batch"]
        sources = {"train": folder / "data_batch_{1..5}", "val": folder / "data_batch_5",
                   "test": folder / "test_batch"}
    elif (data_dir / "cifar10" / "dataset_dict.json").exists():
        ds = _load_from_disk(data_dir / "cifar10")
        conv = {}
        for s in ("train", "test"):
            img_col = "img" if "img" in ds[s].column_names else "image"
            rgb = np.stack([np.asarray(im.convert("RGB")).transpose(2, 0, 1) for im in ds[s][img_col]])
            conv[s] = (_gray(rgb), np.asarray(ds[s]["label"], dtype=np.int64))
        (train_x, train_y), (test_x, test_y) = conv["train"], conv["test"]
        sources = {"train": data_dir / "cifar10" / "train", "val": data_dir / "cifar10" / "train",
                   "test": data_dir / "cifar10" / "test"}
    else:
        raise _missing("image", data_dir, [f"cifar-10-batches-py/{n}" for n in names]
                       + ["or cifar10/ (datasets.save_to_disk)"])
    n_val = len(train_x) // 10  # 5k of 50k: the last tenth of the training batches
    n_train = len(train_x) - n_val

    def make(split, x, y):
        ds = TokenDataset([row[:max_len] for row in x], y.tolist(), sources[split])
        return _checked("image", split, ds, [x.shape[1]] * len(x), max_len)
    return {"train": make("train", train_x[:n_train], train_y[:n_train]),
            "val": make("val", train_x[n_train:], train_y[n_train:]), "test": make("test", test_x, test_y)}


class PathfinderDataset(Dataset):
    """Pathfinder PNGs read lazily; items are (LongTensor (res*res,) gray values, int label)."""

    def __init__(self, paths: list[Path], labels: list[int], resolution: int, max_len: int, source: str | Path = "?"):
        self.paths, self.labels = paths, labels
        self.resolution, self.max_len = resolution, max_len
        self.source, self.truncated = str(source), (0, 0, 0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            pixels = np.asarray(im.convert("L"), dtype=np.uint8)  # (res, res)
        if pixels.shape != (self.resolution, self.resolution):
            raise ValueError(f"{self.paths[i]}: image is {pixels.shape[1]}x{pixels.shape[0]}, "
                             f"expected {self.resolution}x{self.resolution}")
        return torch.from_numpy(pixels.reshape(-1)[:self.max_len].astype(np.int64)), self.labels[i]


def _read_pathfinder(task: str, data_dir: Path, max_len: int, resolution: int,
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
        raise _missing(task, data_dir, [f"pathfinder{resolution}/{sub}/metadata/<b>.npy",
                                        f"pathfinder{resolution}/{sub}/imgs/<b>/sample_<k>.png"])
    paths, labels, skipped = [], [], 0
    for meta in meta_files:
        for lineno, line in _utf8_lines(meta):
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
        out[s] = _checked(task, s, ds, [resolution * resolution] * len(idx), max_len)
    return out


def load_task(task: str, data_dir: str | Path, *, max_len: int | None = None,
              pathfinder_resolution: int | None = None, contour_length: int = 14) -> dict[str, Dataset]:
    """Read one LRA task from `data_dir`; return {"train", "val", "test"} datasets of (ids, label).

    `max_len` truncates every sequence (default: the task's full length). Pathfinder reads
    `pathfinder{pathfinder_resolution}` (default 32; Path-X 128) at difficulty `contour_length`
    (6 = curv_baseline, 9, 14 = the LRA setting).
    """
    info = task_facts(task)
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
    max_len = info.seq_len if max_len is None else max_len
    data_dir = Path(data_dir)
    if task == "listops":
        return _read_listops(data_dir, max_len)
    if task == "text":
        return _read_text(data_dir, max_len)
    if task == "retrieval":
        return _read_retrieval(data_dir, max_len)
    if task == "image":
        return _read_image(data_dir, max_len)
    resolution = pathfinder_resolution or info.resolution
    if resolution not in (32, 64, 128, 256):
        raise ValueError(f"pathfinder_resolution must be 32, 64, 128 or 256, got {resolution}")
    return _read_pathfinder(task, data_dir, min(max_len, resolution * resolution), resolution, contour_length)


def collate(batch, *, pad_id: int = 0):
    """Right-pad a list of (ids, label) items.

    Returns x (B, L) long, lengths (B,), y (B,); for two-input items (2, L_i) it returns
    x (B, 2, L), lengths (B, 2) (each document's true length; token 0 is padding in every
    byte vocabulary), y (B,).
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    seqs = [torch.as_tensor(ids) for ids, _ in batch]
    y = torch.tensor([int(label) for _, label in batch], dtype=torch.long)  # (B,)
    dual = seqs[0].dim() == 2
    if any(s.dim() != seqs[0].dim() for s in seqs):
        raise ValueError(f"collate: items mix shapes {sorted({tuple(s.shape[:-1]) for s in seqs})}")
    L = max(s.shape[-1] for s in seqs)
    if dual:
        x = torch.full((len(seqs), 2, L), pad_id, dtype=torch.long)  # (B, 2, L)
        lengths = torch.zeros(len(seqs), 2, dtype=torch.long)  # (B, 2)
        for i, s in enumerate(seqs):
            n = (s != 0).long().sum(-1)  # (2,)
            lengths[i] = n
            for d in range(2):
                x[i, d, :n[d]] = s[d, :n[d]]
    else:
        x = torch.full((len(seqs), L), pad_id, dtype=torch.long)  # (B, L)
        lengths = torch.tensor([s.shape[-1] for s in seqs], dtype=torch.long)  # (B,)
        for i, s in enumerate(seqs):
            x[i, :s.shape[-1]] = s
    return x, lengths, y
