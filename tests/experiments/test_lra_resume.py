"""LRA trainer resume: periodic checkpoints, crash and resume mid-epoch bit-identical to an
uninterrupted run, no duplicate metric records, and refusal of a different world size."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.lra import loop, train
from experiments.lra.data.fixtures import write_fixtures

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model.d_model=8", "--model.n_layers=1", "--model.ssm.d_state=4", "--train.progress=false",
        "--train.log_every=1", "--data.batch_size=3", "--model.ssm.dropout=0.3", "--train.epochs=3"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("lra_resume") / "listops", "listops")


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", "listops", "--model", "s4d", "--data-dir", str(data), "--out", str(out), *TINY, *extra]


def _run(argv: list[str], checkpoint_every: int | None = None) -> dict:
    """train.main, with train.checkpoint_every set on the parsed config (whether or not the CLI knows it)."""
    args, cfg = train.parse_args(argv)
    cfg.train.checkpoint_every = checkpoint_every
    torch.set_num_threads(1)
    return train.run(cfg, data_dir=args.data_dir, out=args.out, resume=args.resume, force=args.force)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict:
    return torch.load(out / "last.pt", weights_only=False)["model"]


class _Crash(Exception):
    pass


def test_checkpoint_every_and_crash_resume_is_bit_identical(data, tmp_path, monkeypatch, capsys):
    """A crash after step 5 loses nothing but steps 5: resuming from the step-4 checkpoint (mid-epoch:
    3 steps per epoch) ends with the same weights, bit for bit, as a run never interrupted."""
    _run(_argv(data, tmp_path / "full", "--max-steps", "8"))
    real_step = loop.train_step
    calls = {"n": 0}

    def crashing_step(tr, *batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise _Crash("simulated SIGKILL before step 6")
        return real_step(tr, *batch)

    monkeypatch.setattr(loop, "train_step", crashing_step)
    with pytest.raises(_Crash):
        _run(_argv(data, tmp_path / "cut", "--max-steps", "8"), checkpoint_every=2)
    monkeypatch.setattr(loop, "train_step", real_step)
    ckpt = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert ckpt["state"]["step"] == 4 and ckpt["state"]["batch_in_epoch"] == 1  # mid-epoch
    assert not list((tmp_path / "cut").glob("*.tmp"))  # written through a temporary file, renamed
    assert max(r["step"] for r in _records(tmp_path / "cut")) == 5  # step 5 logged, then lost
    capsys.readouterr()
    _run(_argv(data, tmp_path / "cut", "--max-steps", "8", "--resume"), checkpoint_every=2)
    assert "resumed from step 4 (epoch 2, batch 1 of 3)" in capsys.readouterr().out
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    full = [(r["split"], r["step"], r.get("loss")) for r in _records(tmp_path / "full")]
    cut = [(r["split"], r["step"], r.get("loss")) for r in _records(tmp_path / "cut")]
    assert cut == full  # same records, each step once, same losses


def test_resume_at_epoch_end_writes_no_duplicate_records(data, tmp_path):
    """Stop exactly at an epoch end (step 3), resume to step 6: each (split, step) appears once."""
    out = tmp_path / "r"
    _run(_argv(data, out, "--max-steps", "3"))
    _run(_argv(data, out, "--max-steps", "6", "--resume"))
    keys = [(r["split"], r["step"]) for r in _records(out)]
    assert len(keys) == len(set(keys)), keys
    assert [k for k in keys if k[0] == "train"] == [("train", s) for s in range(1, 7)]
    assert sum(k[0] == "test" for k in keys) == 1


def test_resume_refuses_another_world_size(data, tmp_path):
    out = tmp_path / "w"
    _run(_argv(data, out, "--max-steps", "1"))
    ckpt = torch.load(out / "last.pt", weights_only=False)
    ckpt["layout"] = dict(ckpt["layout"], world_size=2, global_batch=6, steps_per_epoch=2, total_steps=6)
    torch.save(ckpt, out / "last.pt")  # as if written by `torchrun --nproc_per_node 2`
    with pytest.raises(ValueError, match=r"world_size: 2 -> 1.*torchrun --nproc_per_node 2"):
        _run(_argv(data, out, "--max-steps", "2", "--resume"))


def test_checkpoint_records_layout_and_position(data, tmp_path):
    out = tmp_path / "l"
    _run(_argv(data, out, "--max-steps", "2"))
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["layout"] == {"world_size": 1, "batch_per_rank": 3, "global_batch": 3, "steps_per_epoch": 3,
                              "total_steps": 9}
    assert (ckpt["state"]["epoch"], ckpt["state"]["batch_in_epoch"], ckpt["state"]["step"]) == (0, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["listops", "retrieval"])
def test_torchrun_two_processes_then_one_is_refused(task, tmp_path):
    """A real 2-process gloo run (DDP without find_unused_parameters: Retrieval's two-tower model must
    give every parameter a gradient), then a 1-process resume, which is refused."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    data = write_fixtures(tmp_path / "data", task)
    out = tmp_path / "ddp"
    argv = _argv(data, out, "--max-steps", "2")
    argv[argv.index("--task") + 1] = task
    env = dict(os.environ, PYTHONPATH=str(REPO), SSMKIT_DISABLE_TRITON="1", OMP_NUM_THREADS="1")
    done = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "experiments.lra.train", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert torch.load(out / "last.pt", weights_only=False)["layout"]["world_size"] == 2
    again = subprocess.run([sys.executable, "-m", "experiments.lra.train", *argv, "--resume", "--max-steps", "3"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "world_size: 2 -> 1" in again.stderr
