"""Long Range Arena data: readers for the original release layouts, datasets and batching.

The tasks, their files and their tokenization are described in `docs/lra.md`; the per-task facts
(classes, vocabulary, full length) live in one table, `experiments.lra.tasks`. Readers: `text` (ListOps, Text, Retrieval) and
`images` (CIFAR-10, Pathfinder); `common` holds the dataset class, checks and `collate`. The
generators of the synthetic tasks (`listops`, `pathfinder`, CLI `generate`) and the test files
(`fixtures`) live here too.

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

from pathlib import Path

from torch.utils.data import Dataset

from experiments.lra.data.common import SPLITS, TokenDataset, collate
from experiments.lra.data.images import PATHFINDER_FOLDERS, PathfinderDataset, read_image, read_pathfinder
from experiments.lra.data.text import LISTOPS_VOCAB, read_listops, read_retrieval, read_text
from experiments.lra.tasks import task_info

__all__ = ["LISTOPS_VOCAB", "PATHFINDER_FOLDERS", "SPLITS", "PathfinderDataset", "TokenDataset", "collate",
           "load_task"]


def load_task(task: str, data_dir: str | Path, *, max_len: int | None = None,
              pathfinder_resolution: int | None = None, contour_length: int = 14) -> dict[str, Dataset]:
    """Read one LRA task from `data_dir`; return {"train", "val", "test"} datasets of (ids, label).

    `max_len` truncates every sequence (default: the task's full length). Pathfinder reads
    `pathfinder{pathfinder_resolution}` (default 32; Path-X 128) at difficulty `contour_length`
    (6 = curv_baseline, 9, 14 = the LRA setting).
    """
    info = task_info(task)
    if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
    max_len = info.seq_len if max_len is None else max_len
    data_dir = Path(data_dir)
    if task == "listops":
        return read_listops(data_dir, max_len)
    if task == "text":
        return read_text(data_dir, max_len)
    if task == "retrieval":
        return read_retrieval(data_dir, max_len)
    if task == "image":
        return read_image(data_dir, max_len)
    resolution = pathfinder_resolution or info.resolution
    if resolution not in (32, 64, 128, 256):
        raise ValueError(f"pathfinder_resolution must be 32, 64, 128 or 256, got {resolution}")
    return read_pathfinder(task, data_dir, min(max_len, resolution * resolution), resolution, contour_length)

