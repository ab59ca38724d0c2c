"""The task registry, a streamed dataset per split, and the train/val/test loaders.

`TASKS[name]` is a `Task`: its config class (the knobs and their defaults), its generator and
its independent checker (`experiments.synthetic.checkers`). `SyntheticDataset` draws sample `i`
on demand from the generator seeded with (seed, split, i), so nothing is materialized and any
sample can be re-drawn alone. `build_loaders` returns DataLoaders of
`(ids (B, L) long, targets (B, L) long)`, -100 where there is no label. `docs/synthetic.md`
describes the tasks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from experiments.synthetic import checkers, recall, state_tracking
from experiments.synthetic.common import SPLITS, check_int, sample_rng


@dataclass(frozen=True)
class Task:
    """One synthetic task: `config` is its dataclass, `generate(cfg, rng) -> (x, y)` int64 arrays
    (L,), `check(cfg, x: list[int]) -> list[int]` the expected targets from the input alone."""

    name: str
    config: type
    generate: Callable
    check: Callable


TASKS = {
    "mqar": Task("mqar", recall.MQARConfig, recall.generate_mqar, checkers.check_mqar),
    "selective_copy": Task("selective_copy", recall.SelectiveCopyConfig, recall.generate_selective_copy,
                           checkers.check_selective_copy),
    "induction": Task("induction", recall.InductionConfig, recall.generate_induction, checkers.check_induction),
    "parity": Task("parity", state_tracking.ParityConfig, state_tracking.generate_parity, checkers.check_parity),
    "modadd": Task("modadd", state_tracking.ModAddConfig, state_tracking.generate_modadd, checkers.check_modadd),
    "s5": Task("s5", state_tracking.S5Config, state_tracking.generate_s5, checkers.check_s5),
}


def task_of(config) -> Task:
    """The registered task whose config class `config` is an instance of."""
    for task in TASKS.values():
        if type(config) is task.config:
            return task
    raise TypeError(f"config must be one of the task configs "
                    f"{[t.config.__name__ for t in TASKS.values()]}, got {type(config).__name__}")


def sample(config, seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of `split`: (ids (L,), targets (L,)) int64, a pure function of its arguments."""
    return task_of(config).generate(config, sample_rng(seed, split, index))


class SyntheticDataset(Dataset):
    """`n` samples of one split, generated on demand; items are (ids (L,), targets (L,)) long tensors."""

    def __init__(self, config, n: int, *, seed: int, split: str):
        check_int("n", n, 0)
        sample_rng(seed, split, 0)  # validates seed and split now rather than at the first item
        self.config, self.n, self.seed, self.split = config, int(n), int(seed), split
        self.task = task_of(config)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        x, y = self.task.generate(self.config, sample_rng(self.seed, self.split, i % self.n))
        return torch.from_numpy(x), torch.from_numpy(y)


def length_sweep(config, factors=(1, 2, 4, 8, 16)) -> dict[int, object]:
    """{factor: config with seq_len * factor}, for testing at lengths beyond the training one."""
    out = {}
    for f in factors:
        check_int("factor", f, 1)
        out[f] = dataclasses.replace(config, seq_len=config.seq_len * f)
    return out


def build_loaders(config, batch_size: int, seed: int, n_train: int, n_val: int, n_test: int, *,
                  test_config=None, num_workers: int = 0) -> dict[str, DataLoader]:
    """{"train", "val", "test"} DataLoaders of (ids (B, L), targets (B, L)) long tensors.

    The training split is reshuffled every epoch by a generator seeded with `seed` (the samples
    themselves never change); val and test keep their order. `test_config` (same task, e.g. a
    longer `seq_len` from `length_sweep`) replaces `config` for the test split only.
    """
    check_int("batch_size", batch_size, 1)
    task_of(config)
    test_config = config if test_config is None else test_config
    if task_of(test_config) is not task_of(config):
        raise ValueError(f"test_config must be a {type(config).__name__}, got {type(test_config).__name__}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for name, n in sizes.items():
        check_int(f"n_{name}", n, 0)
    order = torch.Generator().manual_seed(int(seed))
    loaders = {}
    for split in SPLITS:
        ds = SyntheticDataset(test_config if split == "test" else config, sizes[split], seed=seed, split=split)
        train = split == "train" and sizes[split] > 0
        loaders[split] = DataLoader(ds, batch_size=batch_size, shuffle=train, generator=order if train else None,
                                    num_workers=num_workers)
    return loaders
