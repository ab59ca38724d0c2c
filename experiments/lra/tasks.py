"""The six Long Range Arena tasks: one table of facts shared by config, data, models and train.

Each task is a frozen `Task`; `TASKS` is the tuple of names in the LRA paper's order, `task_info(name)`
looks one up (ValueError naming the allowed names otherwise). Descriptions of the tasks, their data
and their tokenization: `docs/lra.md`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """Facts about one LRA task.

    name: the task's name on the command line.
    n_classes: number of output classes.
    seq_len: the published (full) sequence length of one input; for Retrieval, of each document.
    input_kind: "tokens" (text-like ids) or "pixels" (gray values 0..255 in raster order).
    vocab_size: size of the id vocabulary fed to an embedding, id 0 = padding for token tasks;
        256 gray values for pixel tasks (no padding: every image has full length).
    tokenization: how raw data becomes ids: "listops" (operator/digit tokens), "byte" (UTF-8 byte + 1),
        "pixel" (gray value).
    resolution: image side in pixels (pixel tasks), else None; `seq_len == resolution ** 2`.
    two_tower: True when an example is a pair of documents classified together (Retrieval).
    folder: the folder of the official release layout that holds the task's files.
    n_train, n_val: examples in the published training and validation splits (Text has no validation
        split: its test set of 25,000 doubles as one); they set the steps per epoch of the presets.
    """

    name: str
    n_classes: int
    seq_len: int
    input_kind: str
    vocab_size: int
    tokenization: str
    resolution: int | None = None
    two_tower: bool = False
    folder: str = ""
    n_train: int = 0
    n_val: int = 0

    @property
    def is_pixel(self) -> bool:
        return self.input_kind == "pixels"

    @property
    def pixel_channels(self) -> int:
        """Real input channels when pixels enter as values (gray: 1); 0 for token tasks."""
        return 1 if self.is_pixel else 0

    def resolution_len(self, resolution: int | None) -> int:
        """Sequence length at another image `resolution` (pixel tasks); `seq_len` when None."""
        if resolution is None:
            return self.seq_len
        if not self.is_pixel:
            raise ValueError(f"task {self.name!r} has no pixel resolution (got resolution={resolution})")
        return resolution * resolution


_TABLE = (
    Task("listops", n_classes=10, seq_len=2000, input_kind="tokens", vocab_size=16, tokenization="listops",
         folder="listops-1000", n_train=96_000, n_val=2_000),
    Task("text", n_classes=2, seq_len=4096, input_kind="tokens", vocab_size=257, tokenization="byte",
         folder="aclImdb", n_train=25_000, n_val=25_000),
    Task("retrieval", n_classes=2, seq_len=4000, input_kind="tokens", vocab_size=257, tokenization="byte",
         two_tower=True, folder="tsv_data", n_train=147_086, n_val=18_090),
    Task("image", n_classes=10, seq_len=32 * 32, input_kind="pixels", vocab_size=256, tokenization="pixel",
         resolution=32, folder="cifar-10-batches-py", n_train=45_000, n_val=5_000),
    Task("pathfinder", n_classes=2, seq_len=32 * 32, input_kind="pixels", vocab_size=256, tokenization="pixel",
         resolution=32, folder="pathfinder32/curv_contour_length_14", n_train=160_000, n_val=20_000),
    Task("pathx", n_classes=2, seq_len=128 * 128, input_kind="pixels", vocab_size=256, tokenization="pixel",
         resolution=128, folder="pathfinder128/curv_contour_length_14", n_train=160_000,
         n_val=20_000),
)

TASK_TABLE: dict[str, Task] = {t.name: t for t in _TABLE}
TASKS: tuple[str, ...] = tuple(TASK_TABLE)
PIXEL_TASKS: tuple[str, ...] = tuple(t.name for t in _TABLE if t.is_pixel)


def task_info(name: str) -> Task:
    """The `Task` called `name`."""
    if name not in TASK_TABLE:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    return TASK_TABLE[name]
