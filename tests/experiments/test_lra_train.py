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

from experiments.lra import config, overrides, presets, schedules
from experiments.lra import train, trainer
from experiments.lra.data.fixtures import write_fixtures

REPO = Path(__file__).resolve().parents[2]
# Tiny models: the point is that every task/model pair runs end to end, not accuracy.
TINY = ["--model.d_model=8", "--model.n_layers=1", "--model.ssm.d_state=4", "--model.attention.n_heads=2", "--model.attention.d_mlp=16",
        "--data.batch_size=2", "--train.progress=false", "--train.log_every=1"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # The test session turns the Triton interpreter on; training steps use the plain PyTorch path.
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lra_fixtures")
    return {task: write_fixtures(root / task, task) for task in config.TASKS}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- config -----------------------------------------------------------------------------------

def test_split_overrides_both_forms():
    rest, ov = overrides.split_overrides(["--task", "listops", "--model.ssm.d_state=16", "--optim.lr", "3e-3", "--resume"])
    assert rest == ["--task", "listops", "--resume"]
    assert ov == {"model.ssm.d_state": "16", "optim.lr": "3e-3"}


def test_apply_overrides_types():
    cfg = overrides.apply_overrides(presets.preset_config("listops", "s4d", "cpu-small"), {
        "model.ssm.d_state": "16", "optim.lr": "3e-3", "model.bidirectional": "false", "model.ssm.init": "lin",
        "data.max_len": "128", "model.pooling": "last", "train.max_steps": "None"})
    assert cfg.model.ssm.d_state == 16 and isinstance(cfg.model.ssm.d_state, int)
    assert cfg.optim.lr == 3e-3 and cfg.model.bidirectional is False and cfg.model.ssm.init == "lin"
    assert cfg.model.ssm.bidirectional is False  # follows model.bidirectional
    assert cfg.data.max_len == 128 and cfg.model.pooling == "last" and cfg.train.max_steps is None


@pytest.mark.parametrize("key, value, match", [
    ("model.d_stat", "4", r"unknown field --model.d_stat; fields of \[model\]: d_model, n_layers, bidirectional"),
    ("model.ssm.d_stat", "4", r"unknown field --model.ssm.d_stat; fields of \[model.ssm\]: d_state, mode"),
    ("model.ssm", "4", r"--model.ssm is a group of fields; set one of them: --model.ssm.<d_state, mode"),
    ("model.d_state", "64", r"--model.d_state has moved: use --model.ssm.d_state"),
    ("model.norm", "batch", r"--model.norm has moved: use --model.block.norm"),
    ("model.n_heads", "2", r"--model.n_heads has moved: use --model.attention.n_heads"),
    ("model.ssm.mode", "dplr", r"--model.ssm.mode is set by the model from the model name"),
    ("model.attention.bidirectional", "false", r"set by the model from --model.bidirectional"),
    ("model.block.norm", "group", r"--model.block.norm must be one of \('layer', 'batch'\)"),
    ("nosection.x", "1", r"section one of \('data', 'model', 'optim', 'train'\)"),
    ("model.ssm.d_state", "4.5", r"--model.ssm.d_state: expected int, got '4.5'"),
    ("optim.lr", "fast", r"--optim.lr: expected float"),
    ("model.bidirectional", "maybe", r"expected a boolean"),
    ("model.pooling", "max", r"--model.pooling must be one of \('mean', 'last', 'cls'\)"),
    ("model.d_model", "none", r"--model.d_model: expected int, got 'none'"),
])
def test_apply_overrides_errors(key, value, match):
    with pytest.raises(ValueError, match=match):
        overrides.apply_overrides(presets.preset_config("listops", "s4d"), {key: value})


def test_parse_args_cli(tmp_path):
    args, cfg = train.parse_args(["--task", "image", "--model", "s4", "--data-dir", str(tmp_path), "--preset", "paper",
                                  "--max-steps", "7", "--seed", "3", "--model.ssm.dropout=0.1"])
    assert (cfg.task, cfg.model_name, cfg.preset) == ("image", "s4", "paper")
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3 and cfg.model.ssm.dropout == 0.1
    assert args.out == Path("runs/lra/image-s4-paper")
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "mnist", "--model", "s4", "--data-dir", str(tmp_path)])


def test_cli_rejects_unknown_field(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--task", "listops", "--model", "s4d", "--data-dir", ".", "--model.d_stat=3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown field --model.d_stat; fields of [model]: d_model, n_layers, bidirectional" in err


def test_schedule_and_warmup_frac_reach_the_optimizer(fixture_root, tmp_path):
    """The lr logged at every step is the one that step used: lr * lr_multiplier(step - 1) (record
    `step` counts the steps done), with warmup_frac of all steps."""
    out = tmp_path / "lr"
    res = train.main(["--task", "listops", "--model", "s4d", "--data-dir", str(fixture_root["listops"]),
                      "--out", str(out), *TINY, "--data.batch_size=3", "--train.epochs=3",
                      "--optim.warmup_frac=0.34", "--optim.lr=0.02"])
    cfg = presets.build_config("listops", "s4d", "cpu-small", {"optim.warmup_frac": "0.34"})
    total = 9  # 8 examples, batch 3: 3 steps per epoch, 3 epochs
    assert schedules.warmup_and_total(cfg.optim, total)[0] == 3
    lrs = {r["step"]: r["lr"] for r in _metrics(out) if r["split"] == "train"}
    assert res["steps"] == total and sorted(lrs) == list(range(1, total + 1))
    for step, lr in lrs.items():
        assert lr == pytest.approx(0.02 * schedules.lr_multiplier(cfg.optim, step - 1, total), rel=1e-12), step


@pytest.mark.parametrize("clip, calls", [(0.0, 0), (0.5, 2)])
def test_grad_clip_zero_means_no_clipping(fixture_root, tmp_path, monkeypatch, clip, calls):
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, *a, **k: (
        seen.append(max_norm), real(params, max_norm, *a, **k))[1])
    train.main(["--task", "listops", "--model", "s4d", "--data-dir", str(fixture_root["listops"]),
                "--out", str(tmp_path / "c"), *TINY, "--max-steps", "2", f"--optim.grad_clip={clip}"])
    assert seen == [clip] * calls


# --- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", config.MODELS)
@pytest.mark.parametrize("task", config.TASKS)
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
                       *TINY, "--data.batch_size=3", "--model.ssm.dropout=0.3", "--train.epochs=3", *args])


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


def test_quickstart_data_fits_the_cpu_small_length(tmp_path, caplog):
    """The quick start's generated ListOps is never truncated by the preset it trains with."""
    import logging

    from experiments.lra import quickstart
    from experiments.lra.data import load_task

    cfg = presets.build_config("listops", "s4d", "cpu-small")
    assert cfg.data.max_len is None or quickstart.MAX_LENGTH <= cfg.data.max_len
    with caplog.at_level(logging.WARNING, logger="experiments.lra.data"):
        ds = load_task("listops", quickstart.generate_data(tmp_path, n=(30, 10, 10)), max_len=cfg.data.max_len)
    assert "truncated" not in caplog.text
    assert all(d.truncated[0] == 0 for d in ds.values())
    assert max(len(ids) for ids, _ in ds["train"]) < quickstart.MAX_LENGTH


# --- refusals before any work: bad config, unusable data, memory ----------------------------------

def _listops_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", "listops", "--model", "s4d", "--data-dir", str(data_dir), "--out", str(out), *TINY, *extra]


def _copy_fixture(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("split, content, match", [
    ("train", "Source\tTarget\n", r"train split is empty: no examples in .*basic_train\.tsv"),
    ("val", "Source\tTarget\n", r"val split is empty: no examples in .*basic_val\.tsv"),
    ("test", "Source\tTarget\n", r"test split is empty: no examples in .*basic_test\.tsv"),
    ("val", "", r"val split is empty: no examples in .*basic_val\.tsv"),
])
def test_empty_split_is_refused_before_the_run_folder(fixture_root, tmp_path, split, content, match):
    data = _copy_fixture(fixture_root["listops"], tmp_path / "data")
    (data / "listops-1000" / f"basic_{split}.tsv").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        train.main(_listops_argv(data, tmp_path / "run", "--max-steps", "1"))
    assert not (tmp_path / "run").exists()


def test_train_split_smaller_than_one_batch_is_refused(fixture_root, tmp_path):
    with pytest.raises(ValueError, match=r"train split has 8 examples, fewer than one batch \(data.batch_size=9 "
                                         r"x 1 process\(es\) = 9\): .*basic_train\.tsv"):
        train.main(_listops_argv(fixture_root["listops"], tmp_path / "run", "--data.batch_size=9"))
    assert not (tmp_path / "run").exists()


def test_non_utf8_data_through_the_cli_names_file_and_line(fixture_root, tmp_path):
    data = _copy_fixture(fixture_root["listops"], tmp_path / "data")
    path = data / "listops-1000" / "basic_test.tsv"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = b"\xe9" + lines[3]
    path.write_bytes(b"".join(lines))
    env = dict(os.environ, PYTHONPATH=str(REPO), SSMKIT_DISABLE_TRITON="1")
    done = subprocess.run([sys.executable, "-m", "experiments.lra.train", *_listops_argv(data, tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "basic_test.tsv, line 4: not UTF-8 text (byte 0xe9 at column 1)" in done.stderr
    assert not (tmp_path / "run").exists()


def test_config_is_validated_before_data_and_folder(fixture_root, tmp_path, monkeypatch):
    from experiments.lra import data as D

    args, cfg = train.parse_args(_listops_argv(fixture_root["listops"], tmp_path / "run"))
    cfg.optim.lr = float("nan")  # as if set after parsing: run() checks again
    monkeypatch.setattr(D, "load_task", lambda *a, **k: pytest.fail("data loaded before validation"))
    with pytest.raises(ValueError, match=r"optim\.lr"):
        train.run(cfg, data_dir=args.data_dir, out=args.out)
    assert not (tmp_path / "run").exists()


def _fake_memory(monkeypatch, available: int) -> None:
    from experiments.lra import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: (available, "test machine"))


def test_memory_refusal_names_estimate_available_and_batch(fixture_root, tmp_path, monkeypatch):
    from experiments.lra import memory

    argv = _listops_argv(fixture_root["listops"], tmp_path / "run", "--data.batch_size=8", "--model.d_model=32",
                         "--max-steps", "1")
    args, cfg = train.parse_args(argv)
    rt = trainer.Runtime(0, 1, torch.device("cpu"), False)
    splits = trainer.load_splits(cfg, args.data_dir, rt)
    tr = trainer.build(cfg, rt, splits, args.out)
    # The estimate is made at the longest sequence the data holds (within the configured length).
    longest = max(len(ids) for ds in splits.values() for ids, _ in ds)
    assert longest < config.sequence_length(cfg)
    est = memory.tensor_estimate(tr.model, seq_shape=(longest,), device=rt.device, amp=False)
    assert est.per_example > 0
    # Room for batch 3 (parameters are already allocated, so they do not count against it).
    available = int((est.peak(3) - est.params) / memory.HEADROOM) + 1
    _fake_memory(monkeypatch, available)
    with pytest.raises(MemoryError) as err:
        train.main(argv)
    msg = str(err.value)
    assert f"estimated peak memory per step {est.peak(8) / 2**30:.2f} GiB at batch 8" in msg
    assert f"available {available / 2**30:.2f} GiB (test machine)" in msg
    assert "try --data.batch_size=3" in msg and "--force" in msg
    assert not (tmp_path / "run").exists()
    res = train.main(argv + ["--force"])
    assert res["steps"] == 1


def test_paper_pathx_on_a_cpu_is_refused(fixture_root, tmp_path, monkeypatch):
    """The published Path-X setting does not fit an 8 GiB CPU machine: refused, with a batch that would."""
    _fake_memory(monkeypatch, 8 * 2**30)
    with pytest.raises(MemoryError, match=r"at batch 16 .*available 8\.00 GiB.*try --data\.batch_size=\d+"):
        train.main(["--task", "pathx", "--model", "s4", "--preset", "paper", "--data-dir", str(fixture_root["pathx"]),
                    "--out", str(tmp_path / "run"), "--train.progress=false", "--train.device=cpu",
                    "--model.ssm.dt_transform=exp"])  # the memory question does not depend on the dt map
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cpu_estimate_covers_a_real_step(tmp_path):
    """Independent check: the resident memory a real batch-16 step adds stays under the estimate."""
    script = r"""
import os, sys, torch
torch.set_num_threads(1)
from experiments.lra import memory, presets
from experiments.lra.models import build_model
cfg = presets.build_config("listops", sys.argv[1], "cpu-small", {"data.max_len": "2000", "model.d_model": "128",
                                                            "model.n_layers": "2"})
model = build_model(cfg)
B, L = 16, 2000
est = memory.tensor_estimate(model, seq_shape=(L,), device=torch.device("cpu"), amp=False)
opt = torch.optim.AdamW(model.parameters())
x, y = torch.randint(1, 16, (B, L)), torch.zeros(B, dtype=torch.long)
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")
base = kib("VmRSS") * 1024
torch.nn.functional.cross_entropy(model(x, None), y).backward()
opt.step()
print(kib("VmHWM") * 1024 - base, est.peak(B) - est.params)
"""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    env = dict(os.environ, PYTHONPATH=str(REPO), SSMKIT_DISABLE_TRITON="1")
    for model in ("s4d", "s4", "transformer"):
        out = subprocess.run([sys.executable, "-c", script, model], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        real, estimate = map(int, out.stdout.split())
        assert real <= estimate, (model, real, estimate)
