"""LRA trainer: config presets and overrides, the schedule, one step per task and model on the tiny
official-format fixtures, exact resume, and interruption by a signal."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.lra import config as C
from experiments.lra import train
from experiments.lra.fixtures import write_fixtures

REPO = Path(__file__).resolve().parents[2]
# Tiny models: the point is that every task/model pair runs end to end, not accuracy.
TINY = ["--model.d_model=8", "--model.n_layers=1", "--model.d_state=4", "--model.n_heads=2", "--model.d_mlp=16",
        "--data.batch_size=2", "--train.progress=false", "--train.log_every=1"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # The test session turns the Triton interpreter on; training steps use the plain PyTorch path.
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lra_fixtures")
    return {task: write_fixtures(root / task, task) for task in C.TASKS}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- config -----------------------------------------------------------------------------------

def test_split_overrides_both_forms():
    rest, ov = C.split_overrides(["--task", "listops", "--model.d_state=16", "--optim.lr", "3e-3", "--resume"])
    assert rest == ["--task", "listops", "--resume"]
    assert ov == {"model.d_state": "16", "optim.lr": "3e-3"}


def test_apply_overrides_types():
    cfg = C.apply_overrides(C.preset_config("listops", "s4d", "cpu-small"), {
        "model.d_state": "16", "optim.lr": "3e-3", "model.bidirectional": "false", "model.init": "none",
        "data.max_len": "128", "model.pooling": "last", "train.max_steps": "None"})
    assert cfg.model.d_state == 16 and isinstance(cfg.model.d_state, int)
    assert cfg.optim.lr == 3e-3 and cfg.model.bidirectional is False and cfg.model.init is None
    assert cfg.data.max_len == 128 and cfg.model.pooling == "last" and cfg.train.max_steps is None


@pytest.mark.parametrize("key, value, match", [
    ("model.d_stat", "4", r"unknown field --model.d_stat; fields of \[model\]: d_model, n_layers, d_state"),
    ("nosection.x", "1", r"section one of \('data', 'model', 'optim', 'train'\)"),
    ("model.d_state", "4.5", r"--model.d_state: expected int, got '4.5'"),
    ("optim.lr", "fast", r"--optim.lr: expected float"),
    ("model.bidirectional", "maybe", r"expected a boolean"),
    ("model.pooling", "max", r"--model.pooling must be one of \('mean', 'last', 'cls'\)"),
    ("model.d_model", "none", r"--model.d_model: expected int, got 'none'"),
])
def test_apply_overrides_errors(key, value, match):
    with pytest.raises(ValueError, match=match):
        C.apply_overrides(C.preset_config("listops", "s4d"), {key: value})


def test_parse_args_cli(tmp_path):
    args, cfg = train.parse_args(["--task", "image", "--model", "s4", "--data-dir", str(tmp_path), "--preset", "paper",
                                  "--max-steps", "7", "--seed", "3", "--model.dropout=0.1"])
    assert (cfg.task, cfg.model_name, cfg.preset) == ("image", "s4", "paper")
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3 and cfg.model.dropout == 0.1
    assert args.out == Path("runs/lra/image-s4-paper")
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "mnist", "--model", "s4", "--data-dir", str(tmp_path)])


def test_cli_rejects_unknown_field(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--task", "listops", "--model", "s4d", "--data-dir", ".", "--model.d_stat=3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown field --model.d_stat; fields of [model]: d_model, n_layers, d_state" in err


def test_paper_presets_match_spec():
    # Published S4 LRA settings (docs/lra.md): d_model, d_state, lr, batch, epochs.
    spec = {"listops": (256, 4, 0.01, 32, 40), "text": (256, 4, 0.01, 16, 32), "retrieval": (256, 4, 0.01, 64, 20),
            "image": (512, 64, 0.01, 50, 200), "pathfinder": (256, 64, 0.004, 64, 200),
            "pathx": (256, 64, 0.001, 16, 50)}
    for task, (d_model, d_state, lr, batch, epochs) in spec.items():
        for model in ("s4", "s4d"):
            cfg = C.preset_config(task, model, "paper")
            got = (cfg.model.d_model, cfg.model.d_state, cfg.optim.lr, cfg.data.batch_size, cfg.train.epochs)
            assert got == (d_model, d_state, lr, batch, epochs), (task, model)
            assert cfg.model.n_layers == 6 and cfg.model.bidirectional and cfg.model.pooling == "mean"
            assert cfg.model.norm == "batch"
            assert cfg.optim.weight_decay == 0.05 and cfg.optim.ssm_lr == 1e-3
            assert cfg.model.dt_min == (1e-4 if task == "pathx" else 1e-3)
    t = C.preset_config("image", "transformer", "paper")
    assert (t.model.n_layers, t.model.n_heads, t.model.d_model, t.model.d_mlp) == (1, 8, 128, 128)
    assert t.model.pos == "learned" and t.model.pooling == "cls" and t.data.pixel_input == "tokens"
    assert C.preset_config("pathfinder", "transformer", "paper").model.pooling == "mean"
    assert C.preset_config("image", "s4d", "paper").data.pixel_input == "real"
    with pytest.raises(ValueError, match="preset must be one of"):
        C.preset_config("listops", "s4d", "huge")


def test_lr_schedule_warmup_then_cosine():
    f = [train.lr_lambda(s, total=100, warmup=10, min_frac=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert train.lr_lambda(100, total=100, warmup=10, min_frac=0.1) == pytest.approx(0.1)


# --- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", C.MODELS)
@pytest.mark.parametrize("task", C.TASKS)
def test_one_step_every_task_and_model(task, model, fixture_root, tmp_path):
    out = tmp_path / "run"
    # Path-X fixtures are 128x128; cap the sequence so the attention baseline stays small.
    extra = ["--data.max_len=1024"] if task == "pathx" else []
    res = train.main(["--task", task, "--model", model, "--data-dir", str(fixture_root[task]), "--out", str(out),
                      "--max-steps", "1", *TINY, *extra])
    assert res["steps"] == 1 and not res["completed"]
    assert 0.0 <= res["test_acc"] <= 1.0 and math.isfinite(res["test_loss"]) and res["n_test"] > 0
    assert 0.0 < res["majority_rate"] <= 1.0 and res["test_mean_len"] >= 1
    assert json.loads((out / "result.json").read_text())["test_acc"] == res["test_acc"]
    rows = _metrics(out)
    first = [r for r in rows if r["split"] == "train"][0]
    assert first["step"] == 1 and math.isfinite(first["loss"])
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["state"]["step"] == 1 and ckpt["config"]["task"] == task


def _run(data_dir: Path, out: Path, *args: str) -> dict:
    return train.main(["--task", "listops", "--model", "s4d", "--data-dir", str(data_dir), "--out", str(out),
                       *TINY, "--data.batch_size=3", "--model.dropout=0.3", "--train.epochs=3", *args])


def test_resume_continues_exactly(fixture_root, tmp_path):
    """k steps, stop, resume: the following losses equal the uninterrupted run's, across an epoch end."""
    data = fixture_root["listops"]
    _run(data, tmp_path / "full", "--max-steps", "6")
    _run(data, tmp_path / "cut", "--max-steps", "2")
    _run(data, tmp_path / "cut", "--max-steps", "6", "--resume")
    full = {r["step"]: r["loss"] for r in _metrics(tmp_path / "full") if r["split"] == "train"}
    cut = {r["step"]: r["loss"] for r in _metrics(tmp_path / "cut") if r["split"] == "train"}
    assert sorted(full) == sorted(cut) == [1, 2, 3, 4, 5, 6]  # 3 steps per epoch: step 4 is in epoch 2
    for step in range(3, 7):
        assert cut[step] == full[step], f"step {step}: resumed loss {cut[step]} != uninterrupted {full[step]}"
    # Dropout is on: a resume that forgot the RNG state would not have matched.
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_guards(fixture_root, tmp_path):
    data = fixture_root["listops"]
    _run(data, tmp_path / "r", "--max-steps", "1")
    with pytest.raises(FileExistsError, match="pass --resume"):
        _run(data, tmp_path / "r", "--max-steps", "2")
    with pytest.raises(ValueError, match=r"optim.lr: \S+ -> 0.1"):
        _run(data, tmp_path / "r", "--max-steps", "2", "--resume", "--optim.lr=0.1")


def test_sigint_writes_checkpoint_and_resumes(fixture_root, tmp_path):
    out = tmp_path / "sig"
    env = dict(os.environ, PYTHONPATH=str(REPO), SSMKIT_DISABLE_TRITON="1")
    cmd = [sys.executable, "-m", "experiments.lra.train", "--task", "listops", "--model", "s4d", "--data-dir",
           str(fixture_root["listops"]), "--out", str(out), *TINY, "--train.epochs=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert "(signal)" in log and not (out / "result.json").exists()
    step = torch.load(out / "last.pt", weights_only=False)["state"]["step"]
    assert step >= 1
    res = train.main(cmd[3:] + ["--resume", "--max-steps", str(step + 1)])
    assert res["steps"] == step + 1


def test_quickstart_end_to_end_smoke(tmp_path, monkeypatch, capsys):
    from experiments.lra import quickstart

    # Tiny generated set and two steps per model: checks the wiring and the final table, not accuracy.
    for name, value in (("N_TRAIN", 12), ("N_VAL", 6), ("N_TEST", 6), ("MIN_LENGTH", 10), ("MAX_LENGTH", 40)):
        monkeypatch.setattr(quickstart, name, value)
    results = quickstart.main(["--out", str(tmp_path), "--max-steps", "2", *TINY])
    assert [r["model"] for r in results] == ["s4d", "transformer"] and all(r["steps"] == 2 for r in results)
    out = capsys.readouterr().out
    assert "| s4d |" in out and "| transformer |" in out and "majority class" in out
    assert (tmp_path / "summary.md").read_text().strip() in out
    assert json.loads((tmp_path / "s4d" / "result.json").read_text())["n_test"] == 6
