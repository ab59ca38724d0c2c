"""Readers of the LRA text-like tasks: ListOps (TSV), Text (IMDB folders or a saved `datasets`
dataset) and Retrieval (AAN pairs TSV). Formats and tokenization: `docs/lra.md`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from experiments.lra.data.common import (SPLITS, TokenDataset, bytes_tokens, checked, load_from_disk, locate,
                                         missing_error, utf8_lines)

LISTOPS_VOCAB = {**{str(d): d + 1 for d in range(10)}, "[MIN": 11, "[MAX": 12, "[MED": 13, "[SM": 14, "]": 15}


def read_listops(data_dir: Path, max_len: int) -> dict[str, Dataset]:
    names = {s: f"basic_{s}.tsv" for s in SPLITS}
    folder = locate(data_dir, "listops-1000", names["train"])
    if folder is None or not all((folder / n).exists() for n in names.values()):
        raise missing_error("listops", data_dir, [f"listops-1000/{n}" for n in names.values()])
    out = {}
    for split, name in names.items():
        path = folder / name
        seqs, labels, lengths = [], [], []
        for lineno, line in utf8_lines(path):
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
        out[split] = checked("listops", split, TokenDataset(seqs, labels, path), lengths, max_len)
    return out


def read_retrieval(data_dir: Path, max_len: int) -> dict[str, Dataset]:
    names = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv",
             "test": "new_aan_pairs.test.tsv"}
    folder = locate(data_dir, "tsv_data", names["train"])
    if folder is None or not all((folder / n).exists() for n in names.values()):
        raise missing_error("retrieval", data_dir, [f"tsv_data/{n}" for n in names.values()])
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
                a, b = bytes_tokens(fields[3], max_len), bytes_tokens(fields[4], max_len)
                pair = np.zeros((2, max(len(a), len(b), 1)), dtype=np.int16)  # (2, L_i)
                pair[0, :len(a)], pair[1, :len(b)] = a, b
                seqs.append(pair)
                labels.append(label)
                lengths.append(max(len(fields[3]), len(fields[4])))
        out[split] = checked("retrieval", split, TokenDataset(seqs, labels, path), lengths, max_len)
    return out


def read_text(data_dir: Path, max_len: int) -> dict[str, Dataset]:
    folder = locate(data_dir, "aclImdb", "train/pos")
    if folder is not None:
        splits = {}
        for split in ("train", "test"):
            seqs, labels, lengths = [], [], []
            for polarity, label in (("neg", 0), ("pos", 1)):
                sub = folder / split / polarity
                if not sub.is_dir():
                    raise missing_error("text", data_dir, [f"aclImdb/{split}/{polarity}/*.txt"])
                for path in sorted(sub.glob("*.txt")):
                    raw = path.read_bytes()
                    seqs.append(bytes_tokens(raw, max_len))
                    labels.append(label)
                    lengths.append(len(raw))
            ds = TokenDataset(seqs, labels, f"{folder / split}/{{neg,pos}}/*.txt")
            splits[split] = checked("text", split, ds, lengths, max_len)
        return {"train": splits["train"], "val": splits["test"], "test": splits["test"]}
    if (data_dir / "imdb" / "dataset_dict.json").exists():
        ds = load_from_disk(data_dir / "imdb")
        splits = {}
        for s in ("train", "test"):
            raw = [t.encode("utf-8") for t in ds[s]["text"]]
            tokens = TokenDataset([bytes_tokens(t, max_len) for t in raw], ds[s]["label"], data_dir / "imdb" / s)
            splits[s] = checked("text", s, tokens, [len(t) for t in raw], max_len)
        return {"train": splits["train"], "val": splits["test"], "test": splits["test"]}
    raise missing_error("text", data_dir, ["aclImdb/{train,test}/{pos,neg}/*.txt",
                                      "or imdb/ (datasets.save_to_disk)"])

