"""What every LRA reader shares: the dataset of token arrays, the split checks, text decoding,
the hint printed when data is missing, and batching (`collate`). Formats: `docs/lra.md`."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger("experiments.lra.data")

SPLITS = ("train", "val", "test")


def generate_hint(task: str) -> str:
    return {
        "listops": "generate it with: python -m experiments.lra.data.generate listops --out DATA_DIR "
                   "--n-train 96000 --n-val 2000 --n-test 2000 --seed 0",
        "pathfinder": "generate it with: python -m experiments.lra.data.generate pathfinder --out DATA_DIR "
                      "--resolution 32 --contour-length 14 --n 200000 --seed 0 --workers 8",
        "pathx": "generate it with: python -m experiments.lra.data.generate pathfinder --out DATA_DIR "
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


def missing_error(task: str, data_dir: Path, expected: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"LRA {task}: no data under {data_dir}; expected {', '.join(expected)}. {generate_hint(task)}")


def locate(data_dir: Path, folder: str, probe: str) -> Path | None:
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


def checked(task: str, split: str, ds: Dataset, lengths: list[int], max_len: int) -> Dataset:
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


def utf8_lines(path: Path):
    """(line number, decoded line) of a text file; a non-UTF-8 line is a ValueError naming file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                 f"column {e.start + 1})") from None


def bytes_tokens(text: str | bytes, max_len: int) -> np.ndarray:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(raw[:max_len], dtype=np.uint8).astype(np.int16) + 1  # (L_i,)



def load_from_disk(path: Path):
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{path} is a saved `datasets` dataset; install the `datasets` package "
                          "(pip install 'ssmkit[experiments]') to read it") from e
    return datasets.load_from_disk(str(path))



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
