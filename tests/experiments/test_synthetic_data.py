"""Synthetic tasks: generated targets vs independent checkers, determinism, knob checks, loaders."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from experiments.synthetic import (TASKS, InductionConfig, ModAddConfig, MQARConfig, ParityConfig, S5Config,
                                   SelectiveCopyConfig, build_loaders, length_sweep, sample)
from experiments.synthetic import checkers
from experiments.synthetic.common import SPLITS
from experiments.synthetic.state_tracking import s5_permutations

# Small lengths keep 10,000 samples per task fast; the knobs that change the layout are covered.
AGREEMENT = {
    "mqar": MQARConfig(vocab_size=512, num_kv_pairs=8, seq_len=64),
    "selective_copy": SelectiveCopyConfig(vocab_size=16, n_tokens=8, seq_len=64),
    "induction": InductionConfig(vocab_size=16, seq_len=64),
    "parity": ParityConfig(seq_len=32),
    "modadd": ModAddConfig(modulus=7, seq_len=32),
    "s5": S5Config(seq_len=32),
}
VARIANTS = [
    MQARConfig(vocab_size=40, num_kv_pairs=19, seq_len=77, power_a=1.0, random_non_queries=False),
    MQARConfig(vocab_size=8192, num_kv_pairs=4, seq_len=33, power_a=2.5),
    SelectiveCopyConfig(vocab_size=3, n_tokens=5, seq_len=10),
    InductionConfig(vocab_size=3, seq_len=3),
    ParityConfig(seq_len=1, mode="final"),
    ModAddConfig(modulus=2, seq_len=17, mode="final"),
    S5Config(seq_len=9, mode="final"),
]


def _agree(cfg, n: int, seed: int = 0):
    task = next(t for t in TASKS.values() if isinstance(cfg, t.config))
    for i in range(n):
        split = SPLITS[i % 3]
        x, y = sample(cfg, seed, split, i // 3)
        assert x.shape == y.shape == (cfg.seq_len,) and x.dtype == y.dtype == np.int64
        assert x.min() >= 0 and x.max() < cfg.vocab_size
        labelled = y[y != -100]
        assert labelled.size and labelled.min() >= 0 and labelled.max() < cfg.n_classes
        expected = task.check(cfg, x.tolist())
        assert expected == y.tolist(), f"{task.name} sample {split}/{i // 3} disagrees with its checker"


@pytest.mark.parametrize("name", list(AGREEMENT))
def test_targets_agree_with_the_independent_checker_on_10000_samples(name):
    _agree(AGREEMENT[name], 10_000)


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: type(c).__name__)
def test_targets_agree_on_edge_knobs(cfg):
    _agree(cfg, 300, seed=5)


def test_registry_defaults_are_valid_and_generate():
    assert set(TASKS) == {"mqar", "selective_copy", "induction", "parity", "modadd", "s5"}
    for task in TASKS.values():
        cfg = task.config()
        x, y = sample(cfg, 0, "test", 3)
        assert task.check(cfg, x.tolist()) == y.tolist()


@pytest.mark.parametrize("name", list(AGREEMENT))
def test_same_seed_same_samples_other_seed_or_split_different(name):
    cfg = AGREEMENT[name]
    a = [sample(cfg, 11, "train", i) for i in range(8)]
    b = [sample(cfg, 11, "train", i) for i in reversed(range(8))][::-1]  # order of requests does not matter
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    other_seed = [sample(cfg, 12, "train", i)[0] for i in range(8)]
    other_split = [sample(cfg, 11, "val", i)[0] for i in range(8)]
    assert not all(np.array_equal(xa, xo) for (xa, _), xo in zip(a, other_seed))
    assert not all(np.array_equal(xa, xo) for (xa, _), xo in zip(a, other_split))
    assert len({xa.tobytes() for xa, _ in a}) > 1  # samples within a split differ


@pytest.mark.parametrize("cls,kwargs,knob", [
    (MQARConfig, dict(vocab_size=16, num_kv_pairs=8, seq_len=64), "num_kv_pairs"),
    (MQARConfig, dict(vocab_size=512, num_kv_pairs=8, seq_len=31), "seq_len"),
    (MQARConfig, dict(num_kv_pairs=0), "num_kv_pairs"),
    (MQARConfig, dict(power_a=0.0), "power_a"),
    (MQARConfig, dict(vocab_size=3), "vocab_size"),
    (MQARConfig, dict(random_non_queries=1), "random_non_queries"),
    (SelectiveCopyConfig, dict(n_tokens=16, seq_len=31), "seq_len"),
    (SelectiveCopyConfig, dict(vocab_size=2), "vocab_size"),
    (SelectiveCopyConfig, dict(n_tokens=0), "n_tokens"),
    (InductionConfig, dict(seq_len=2), "seq_len"),
    (InductionConfig, dict(vocab_size=2), "vocab_size"),
    (ParityConfig, dict(seq_len=0), "seq_len"),
    (ParityConfig, dict(mode="last"), "mode"),
    (ModAddConfig, dict(modulus=1), "modulus"),
    (ModAddConfig, dict(seq_len=8.0), "seq_len"),
    (S5Config, dict(seq_len=True), "seq_len"),
])
def test_impossible_knobs_raise_naming_the_knob(cls, kwargs, knob):
    with pytest.raises(ValueError, match=knob):
        cls(**kwargs)


def test_bad_seed_split_and_sizes_raise():
    cfg = ParityConfig(seq_len=4)
    with pytest.raises(ValueError, match="seed"):
        sample(cfg, -1, "train", 0)
    with pytest.raises(ValueError, match="split"):
        sample(cfg, 0, "dev", 0)
    with pytest.raises(ValueError, match="n_val"):
        build_loaders(cfg, 2, 0, 4, -1, 4)
    with pytest.raises(ValueError, match="batch_size"):
        build_loaders(cfg, 0, 0, 4, 4, 4)
    with pytest.raises(TypeError, match="config"):
        build_loaders(object(), 2, 0, 4, 4, 4)
    with pytest.raises(ValueError, match="test_config"):
        build_loaders(cfg, 2, 0, 4, 4, 4, test_config=S5Config())


@pytest.mark.parametrize("x,running", [
    ([1, 0, 1, 1, 0], [1, 1, 0, 1, 1]),
    ([0, 0], [0, 0]),
])
def test_parity_checker_on_hand_examples(x, running):
    assert checkers.check_parity(ParityConfig(seq_len=len(x)), x) == running
    assert checkers.check_parity(ParityConfig(seq_len=len(x), mode="final"), x) == [-100] * (len(x) - 1) + running[-1:]


def test_modadd_and_s5_checkers_on_hand_examples():
    assert checkers.check_modadd(ModAddConfig(modulus=5, seq_len=4), [3, 4, 0, 3]) == [3, 2, 2, 0]
    perms = list(itertools.permutations(range(5)))
    swap34, cycle = perms.index((0, 1, 2, 4, 3)), perms.index((1, 2, 3, 4, 0))
    assert swap34 == 1 and perms[119] == (4, 3, 2, 1, 0)
    # cycle then swap34: k -> cycle[k] -> swap34[cycle[k]].
    then = tuple((0, 1, 2, 4, 3)[(1, 2, 3, 4, 0)[k]] for k in range(5))
    assert then == (1, 2, 4, 3, 0)
    assert checkers.check_s5(S5Config(seq_len=3), [cycle, swap34, swap34]) == [cycle, perms.index(then), cycle]


def test_generator_numbers_permutations_lexicographically():
    assert s5_permutations().tolist() == [list(p) for p in itertools.permutations(range(5))]


def test_recall_checkers_on_hand_examples():
    cfg = MQARConfig(vocab_size=12, num_kv_pairs=2, seq_len=8, random_non_queries=False)
    assert checkers.check_mqar(cfg, [2, 8, 4, 7, 4, 0, 2, 0]) == [-100] * 4 + [7, -100, 8, -100]
    with pytest.raises(ValueError, match="exactly once"):
        checkers.check_mqar(cfg, [2, 8, 4, 7, 4, 0, 4, 0])
    with pytest.raises(ValueError, match="odd offset"):
        checkers.check_mqar(cfg, [2, 8, 4, 7, 4, 2, 0, 0])
    copy = SelectiveCopyConfig(vocab_size=5, n_tokens=2, seq_len=6)
    assert checkers.check_selective_copy(copy, [0, 4, 0, 3, 1, 1]) == [-100] * 4 + [4, 3]
    with pytest.raises(ValueError, match="marker"):
        checkers.check_selective_copy(copy, [0, 4, 0, 3, 1, 2])
    ind = InductionConfig(vocab_size=5, seq_len=6)
    assert checkers.check_induction(ind, [3, 0, 4, 2, 1, 0]) == [-100] * 5 + [4]
    with pytest.raises(ValueError, match="twice"):
        checkers.check_induction(ind, [0, 0, 4, 2, 1, 0])


def test_mqar_query_gaps_follow_the_power_law():
    # One pair: the gap g (query at 2 + 2 g) has probability proportional to (g + 1) ** (a - 1).
    n, space = 2000, 8
    for a in (0.3, 1.0):
        cfg = MQARConfig(vocab_size=64, num_kv_pairs=1, seq_len=2 + 2 * space, power_a=a)
        gaps = [int(np.flatnonzero(sample(cfg, 1, "train", i)[1] != -100)[0] - 2) // 2 for i in range(n)]
        freq = np.bincount(gaps, minlength=space) / n
        p = np.arange(1, space + 1) ** (a - 1.0)
        assert np.abs(freq - p / p.sum()).max() < 0.04, (a, freq)


def test_loaders_shapes_order_and_length_sweep():
    cfg = InductionConfig(vocab_size=8, seq_len=16)
    sweep = length_sweep(cfg, (1, 4))
    assert sweep[4].seq_len == 64 and sweep[1] == cfg
    loaders = build_loaders(cfg, 4, 7, n_train=10, n_val=6, n_test=5, test_config=sweep[4])
    x, y = next(iter(loaders["train"]))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert bool((y[:, :-1] == -100).all()) and bool((y[:, -1] >= 1).all())
    test = [b for b in loaders["test"]]
    assert [tuple(b[0].shape) for b in test] == [(4, 64), (1, 64)]
    fresh, again = (build_loaders(cfg, 4, 7, n_train=10, n_val=6, n_test=5, test_config=sweep[4]) for _ in range(2))
    epochs = [[b[0] for b in fresh["train"]] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(epochs[0], (b[0] for b in again["train"])))  # seeded shuffle
    assert not all(torch.equal(a, b) for a, b in zip(*epochs))  # reshuffled each epoch
    for a, b in zip(test, again["test"]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Each item is the stand-alone sample of its index: the val loader keeps index order.
    xv, yv = next(iter(loaders["val"]))
    x2, y2 = sample(cfg, 7, "val", 2)
    assert np.array_equal(xv[2].numpy(), x2) and np.array_equal(yv[2].numpy(), y2)
    empty = build_loaders(cfg, 4, 7, n_train=0, n_val=0, n_test=0)
    assert [len(list(v)) for v in empty.values()] == [0, 0, 0]


def test_configs_are_frozen_and_replace_rechecks():
    cfg = MQARConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seq_len = 8
    with pytest.raises(ValueError, match="seq_len"):
        dataclasses.replace(cfg, seq_len=8)
