"""`--train.strategy=fsdp` in the LRA trainer (2 CPU processes, gloo): the same loss curve as DDP,
and a run stopped and resumed from its sharded checkpoint == the uninterrupted run, bit for bit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from experiments.lra.data.fixtures import write_fixtures

REPO = Path(__file__).resolve().parents[2]
TINY = ["--preset", "cpu-small", "--model.d_model=8", "--model.n_layers=2", "--model.ssm.d_state=4",
        "--train.epochs=50", "--train.progress=false", "--data.batch_size=2"]

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def _run(data: Path, out: Path, *extra: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), SSMKIT_DISABLE_TRITON="1", OMP_NUM_THREADS="1")
    argv = ["--task", "listops", "--model", "s4d", "--data-dir", str(data), "--out", str(out), *TINY, *extra]
    done = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "experiments.lra.train", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train"]


def test_fsdp_matches_ddp_and_resumes_exactly(tmp_path):
    data = write_fixtures(tmp_path / "data", "listops")
    log = ["--train.log_every=1"]
    _run(data, tmp_path / "ddp", "--max-steps", "6", *log)
    _run(data, tmp_path / "fsdp", "--max-steps", "6", "--train.strategy=fsdp", *log)
    ddp, fsdp = _train_losses(tmp_path / "ddp"), _train_losses(tmp_path / "fsdp")
    assert len(fsdp) == len(ddp) >= 6
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(ddp), rtol=1e-5, atol=1e-6)

    # Stopped at step 3 and resumed to 6: the same losses and the same weights as the full run.
    _run(data, tmp_path / "cut", "--max-steps", "3", "--train.strategy=fsdp", *log)
    ckpt = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert "model" not in ckpt and (tmp_path / "cut" / ckpt["sharded"]).is_dir()
    _run(data, tmp_path / "cut", "--max-steps", "6", "--train.strategy=fsdp", "--resume", *log)
    assert _train_losses(tmp_path / "cut") == fsdp
    assert sorted(p.name for p in (tmp_path / "cut").glob("last-step*.dcp")) == ["last-step00000006.dcp"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    weights = {}
    for run in ("fsdp", "cut"):
        folder = tmp_path / run / torch.load(tmp_path / run / "last.pt", weights_only=False)["sharded"]
        dcp_to_torch_save(folder, tmp_path / f"{run}.pt")
        weights[run] = torch.load(tmp_path / f"{run}.pt", weights_only=False)["model"]
    for name, value in weights["fsdp"].items():
        assert torch.equal(value, weights["cut"][name]), name
