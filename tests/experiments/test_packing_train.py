"""Packed training batches (`--data.pack=true`) in the LRA and synthetic trainers: batch
construction, a packed step equal to the padded step on the same examples, exact resume, refused
configurations, old checkpoints, the tokens-per-second report and `--help`."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from experiments.lra import train
from experiments.lra.data import load_task
from experiments.lra.data.common import TokenDataset, collate
from experiments.lra.data.fixtures import write_fixtures
from experiments.lra.packing import IGNORE, PackedBatch, logits_of, pack_collate
from experiments.lra.trainer import ResumableSampler
from experiments.synthetic import run as synthetic_run
from experiments.synthetic.build import TokenModel
from experiments.synthetic.build import collate as synthetic_collate

TINY = ["--model.d_model=8", "--model.n_layers=1", "--model.ssm.d_state=4", "--train.progress=false",
        "--train.log_every=1", "--data.batch_size=3", "--model.block.norm=layer", "--data.max_len=128"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("pack_train") / "listops", "listops")


def _segments(x: torch.Tensor, seq_idx: torch.Tensor) -> list[torch.Tensor]:
    """The documents of packed rows, row by row, cut wherever seq_idx changes (the model's rule)."""
    out = []
    for row, idx in zip(x, seq_idx):
        cuts = [0] + [j for j in range(1, idx.numel()) if idx[j] != idx[j - 1]] + [idx.numel()]
        out += [row[a:b] for a, b in itertools.pairwise(cuts)]
    return out


def test_packed_batches_hold_every_example_once_per_epoch_whole():
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 30, (23,), generator=gen).tolist()
    seqs = [torch.randint(1, 16, (n,), generator=gen).numpy() for n in lengths]
    ds = TokenDataset(seqs, list(range(len(seqs))))  # label = index: names each example
    sampler = ResumableSampler(ds, num_replicas=1, rank=0, seed=0)
    loader = DataLoader(ds, batch_size=5, sampler=sampler, collate_fn=lambda b: pack_collate(b, pack_len=40))
    seen = []
    for x, packed, y in loader:
        assert x.shape[1] <= 40 and packed.seq_idx.shape == x.shape
        assert x.numel() <= collate([ds[i] for i in y.tolist()])[0].numel()  # never more than padded
        assert bool((packed.seq_idx[:, 1:] >= packed.seq_idx[:, :-1]).all())
        docs = _segments(x, packed.seq_idx)
        assert packed.tokens == sum(lengths[i] for i in y.tolist())
        for i, at in zip(y.tolist(), packed.keep.tolist()):
            assert torch.equal(docs[at], torch.as_tensor(seqs[i]).long())  # whole and unsplit
        fillers = set(range(len(docs))) - set(packed.keep.tolist())
        assert all(bool((docs[j] == 0).all()) for j in fillers)  # only pad tokens outside the examples
        seen += y.tolist()
    assert sorted(seen) == list(range(len(seqs)))


def test_per_position_targets_are_laid_out_like_the_tokens():
    items = [(torch.arange(1, n + 1), torch.arange(100, 100 + n)) for n in (5, 9, 3, 7)]
    x, packed, y = pack_collate(items, pack_len=12)
    assert packed.keep is None and y.shape == x.shape
    assert torch.equal(y[x == 0], torch.full_like(y[x == 0], IGNORE))  # filler: no target
    assert torch.equal(y[x != 0], x[x != 0] + 99)
    with pytest.raises(ValueError, match="never split"):
        pack_collate(items, pack_len=8)


def _lra_model(tmp_path, data):
    _, cfg = train.parse_args(["--task", "listops", "--model", "s4d", "--data-dir", str(data), "--out",
                               str(tmp_path), *TINY, "--model.ssm.dropout=0.0"])
    from experiments.lra.models import build_model
    torch.manual_seed(0)
    return build_model(cfg, dtype=torch.float64)


def _loss_and_grads(model, x, lengths, y):
    model.zero_grad()
    logits = logits_of(model, x, lengths)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["lra", "synthetic"])
def test_packed_step_equals_the_padded_step_on_the_same_examples(tmp_path, data, kind):
    """Loss and every parameter gradient: bidirectional S4D classifier (pooled per document) and a
    causal Mamba-2 per-position model, in float64 except the SSM parameters, which the layers keep in
    float32 (so the two paths agree to float32 rounding of the filter / scan)."""
    gen = torch.Generator().manual_seed(1)
    if kind == "lra":
        model = _lra_model(tmp_path, data)
        items = [(torch.randint(1, 16, (n,), generator=gen), i % 10) for i, n in enumerate((17, 5, 30, 11, 2))]
        padded, packed = collate(items), pack_collate(items, pack_len=32)
    else:
        cfg = synthetic_run.make_config("mqar", "mamba2", "smoke", {"data.pack": "true", "data.pack_len": "40"})
        torch.manual_seed(0)
        model = TokenModel(cfg).double()
        from experiments.synthetic.data import SyntheticDataset
        items = [SyntheticDataset(cfg.task_config, 4, seed=0, split="train")[i] for i in range(4)]
        padded, packed = synthetic_collate(items), pack_collate(items, pack_len=40)  # 2 rows of 32
    assert isinstance(packed[1], PackedBatch) and packed[0].shape[0] < len(items)  # really packed
    loss_a, grads_a = _loss_and_grads(model, *padded)
    loss_b, grads_b = _loss_and_grads(model, *packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-8)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", "listops", "--model", "s4d", "--data-dir", str(data), "--out", str(out), *TINY, *extra]


def _run(argv: list[str]) -> dict:
    args, cfg = train.parse_args(argv)
    torch.set_num_threads(1)
    return train.run(cfg, data_dir=args.data_dir, out=args.out, resume=args.resume, force=args.force)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_packed_run_matches_padded_losses_resumes_exactly_and_reports_tokens(data, tmp_path, capsys):
    """The trainer: a packed run's first steps have the padded run's losses (same examples, float32,
    no dropout); stopped at step 4 (mid-epoch, with dropout) and resumed, a packed run ends bit for
    bit where the uninterrupted one does; both report real tokens, the packed run less padding."""
    pack = ["--data.pack=true", "--data.pack_len=256"]
    padded = _run(_argv(data, tmp_path / "padded", "--max-steps", "2"))
    _run(_argv(data, tmp_path / "packed", *pack, "--max-steps", "2"))
    losses = [[r["loss"] for r in _records(tmp_path / name) if r["split"] == "train"] for name in ("padded", "packed")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    pack += ["--model.ssm.dropout=0.3", "--train.epochs=2"]
    result = _run(_argv(data, tmp_path / "full", *pack))
    _run(_argv(data, tmp_path / "cut", *pack, "--max-steps", "4"))
    capsys.readouterr()
    _run(_argv(data, tmp_path / "cut", *pack, "--resume"))
    assert "resumed from step 4 (epoch 2, batch 1 of 3)" in capsys.readouterr().out
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [[(r["step"], r["loss"]) for r in _records(tmp_path / name) if r["split"] == "train"]
             for name in ("full", "cut")]
    assert steps[1] == steps[0] and len(steps[0]) == 6
    train_split = load_task("listops", data, max_len=128)["train"]
    assert result["train_tokens"] == 2 * sum(len(s) for s in train_split.seqs)  # two epochs, each example once
    assert result["tokens_per_s"] > 0 and 0.0 <= result["pad_frac"] < padded["pad_frac"]
    assert all("tokens_per_s" in r and "pad_frac" in r for r in _records(tmp_path / "cut") if r["split"] == "train")


def test_checkpoint_without_the_field_resumes_and_a_changed_flag_is_refused(data, tmp_path):
    out = tmp_path / "old"
    _run(_argv(data, out, "--max-steps", "1"))
    ckpt = torch.load(out / "last.pt", weights_only=False)
    for key in ("pack", "pack_len"):
        del ckpt["config"]["data"][key]  # as written before the fields existed
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(ValueError, match=r"data\.pack: False -> True"):
        _run(_argv(data, out, "--max-steps", "2", "--resume", "--data.pack=true"))
    assert _run(_argv(data, out, "--max-steps", "2", "--resume"))["steps"] == 2


@pytest.mark.parametrize("extra,word", [
    (["--data.pack=true", "--model.block.norm=batch"], "block.norm=layer"),
    (["--data.pack=true", "--model.pooling=cls"], "pooling=mean or last"),
    (["--data.pack=true", "--data.pack_len=64"], "at least the longest example (128 tokens)"),
    (["--data.pack_len=200"], "needs --data.pack=true"),
    (["--data.pack=maybe"], "data.pack"),
])
def test_lra_refuses_configs_that_cannot_pack(data, tmp_path, capsys, extra, word):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        train.main(_argv(data, out, *extra))
    assert e.value.code == 2 and word in capsys.readouterr().err
    assert not out.exists()


def test_lra_refuses_packing_retrieval_and_synthetic_refuses_a_short_row(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--task", "retrieval", "--model", "s4d", "--data-dir", str(tmp_path), "--data.pack=true",
                    "--model.block.norm=layer"])
    assert "not available for retrieval" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synthetic_run.main(["--task", "mqar", "--model", "s4d", "--preset", "smoke", "--data.pack=true",
                            "--data.pack_len=15", "--out", str(tmp_path / "never")])
    assert "at least the longest example (16 tokens)" in capsys.readouterr().err


def test_synthetic_packed_run_reports_tokens(tmp_path):
    out = tmp_path / "syn"
    result = synthetic_run.main(["--task", "parity", "--model", "s4d", "--preset", "smoke", "--out", str(out),
                                 "--data.pack=true", "--data.pack_len=48", "--max-steps", "2"])
    # 8 samples of 16 tokens: rows of 32 compute as few positions as rows of 16 (the tie goes to the
    # longer rows), rows of 48 more (a third row half filler)
    assert result["train_tokens"] == 2 * 8 * 16 and result["pad_frac"] == 0.0
    assert [r["step"] for r in _records(out) if r["split"] == "train"] == [1, 2]


@pytest.mark.parametrize("main", [train.main, synthetic_run.main])
def test_help_names_the_packing_fields(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "--data.pack=true" in text and "--data.pack_len" in text
