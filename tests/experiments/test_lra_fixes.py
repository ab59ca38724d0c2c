"""LRA experiment faults, each held by a test: the report's headline row, `cost --no-time`, the lr
in metrics.jsonl, damaged Pathfinder images, the quick start's expected numbers, the S4 length the
trainer fixes, the warmup rounding, `min_lr_frac`, the memory estimate's optimizer term, and a
2-process resume restoring every rank's own random state."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from experiments.lra import config, cost, memory, presets, quickstart, report, schedules, train, trainer
from experiments.lra.data import load_task
from experiments.lra.data.fixtures import write_fixtures

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model.d_model=8", "--model.n_layers=1", "--model.ssm.d_state=4", "--train.progress=false",
        "--data.batch_size=3", "--train.epochs=3"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")


def _result(folder: Path, acc: float, steps: int, completed: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(
        {"task": "listops", "model": "s4", "preset": "paper", "test_acc": acc, "steps": steps, "completed": completed}))
    return folder


def test_report_headline_takes_the_finished_run_and_says_which(tmp_path):
    done = _result(tmp_path / "done", 0.5960, 120000, True)
    smoke = _result(tmp_path / "smoke", 0.0312, 3, False)
    text = report.main([str(done), str(smoke), "--no-plots", "--no-published"])  # the smoke run comes last
    row = next(line for line in text.splitlines() if line.startswith("| S4 (paper, this repo)"))
    assert row.split(" | ")[1] == "59.60"
    note = next(line for line in text.splitlines() if line.startswith("- S4 (paper) listops:"))
    assert str(done) in note and "completed, 120000 steps" in note
    assert f"left out: {smoke} (unfinished, stopped at step 3)" in note


def test_report_marks_an_unfinished_run_when_it_is_the_only_one(tmp_path):
    smoke = _result(tmp_path / "smoke", 0.0312, 3, False)
    text = report.main([str(smoke), "--no-plots", "--no-published"])
    row = next(line for line in text.splitlines() if line.startswith("| S4 (paper, this repo)"))
    assert row.split(" | ")[1] == "3.12*"
    assert "NOT a finished run" in text


def test_cost_no_time_reaches_the_measuring_process(monkeypatch, capsys):
    seen = []

    def fake(args, timeout, task, model):
        seen.append(args)
        return {"task": task, "model": model, "error": "not run"}

    monkeypatch.setattr(cost, "_subprocess_json", fake)
    cost.main(["--tasks", "listops", "--models", "s4d", "--no-time"])
    assert seen and "--no-time" in seen[0]
    cost.main(["--tasks", "listops", "--models", "s4d"])
    assert "--no-time" not in seen[1]
    with pytest.raises(SystemExit):
        cost.main(["--full-length", "--no-time"])
    assert "--no-time does not apply to --full-length" in capsys.readouterr().err


def test_metrics_log_the_lr_the_step_used(tmp_path):
    data = write_fixtures(tmp_path / "data", "listops")
    out = tmp_path / "run"
    train.main(["--task", "listops", "--model", "s4d", "--data-dir", str(data), "--out", str(out), *TINY,
                "--train.log_every=1", "--optim.warmup_steps=2", "--max-steps", "4"])
    cfg = json.loads((out / "config.json").read_text())
    total = torch.load(out / "last.pt", weights_only=False)["layout"]["total_steps"]
    optim = config.OptimConfig(**cfg["optim"])
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:  # record `step` counts steps done, so it was made with multiplier(step - 1)
        assert r["lr"] == pytest.approx(optim.lr * schedules.lr_multiplier(optim, r["step"] - 1, total), abs=0)
    assert logged[0]["lr"] == 0.0  # warmup starts at 0


def test_truncated_pathfinder_png_is_refused_at_load_naming_the_file(tmp_path):
    root = write_fixtures(tmp_path, "pathfinder")
    png = root / "pathfinder32" / "curv_contour_length_14" / "imgs" / "0" / "sample_5.png"
    png.write_bytes(png.read_bytes()[:60])  # header intact, image data cut short
    with pytest.raises(ValueError, match=re.escape(str(png))):
        load_task("pathfinder", root)


def test_quickstart_expected_accuracies_match_the_readme():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    labels = {"s4d": "S4D", "transformer": "Transformer", "mamba2": "Mamba-2"}
    for model, acc in quickstart.EXPECTED_ACC.items():
        found = re.search(rf"^\| {labels[model]}[^|]*\| (\d+\.\d+)% \|", text, flags=re.M)
        assert found, f"README has no quick-start row for {labels[model]}"
        assert float(found.group(1)) == acc, f"README {labels[model]}: {found.group(1)}% vs quickstart {acc}%"


def test_quickstart_flags_only_differences_outside_the_spread():
    acc = quickstart.EXPECTED_ACC["s4d"]
    assert quickstart.compare("s4d", acc + 1.0) == f"{acc:.2f}% | +1.00"
    assert quickstart.compare("s4d", acc - quickstart.SPREAD - 0.5).endswith(f"OUTSIDE +-{quickstart.SPREAD:g}")
    assert quickstart.compare("s4", 50.0) == "- | -"


def test_trainer_fixes_the_s4_length_to_the_task_length(tmp_path):
    data = write_fixtures(tmp_path / "data", "listops")
    cfg = presets.build_config("listops", "s4", "cpu-small", {"model.d_model": "8", "model.n_layers": "2",
                                                              "model.ssm.d_state": "4", "data.batch_size": "3"})
    rt = trainer.Runtime(0, 1, torch.device("cpu"), False)
    tr = trainer.build(cfg, rt, trainer.load_splits(cfg, data, rt), tmp_path / "out")
    fixed = [m for m in tr.model.modules() if hasattr(m, "fixed_l_max")]
    assert len(fixed) == 2 and all(m.l_max == config.sequence_length(cfg) == 2000 for m in fixed)


@pytest.mark.parametrize("frac, T, W", [(0.013, 1000, 13), (0.0136, 1000, 14), (0.05, 9, 0), (0.1, 97, 10)])
def test_warmup_is_the_fraction_of_the_schedule_rounded_to_the_nearest_step(frac, T, W):
    optim = config.OptimConfig(warmup_frac=frac, warmup_steps=None, schedule_steps=T)
    assert schedules.warmup_and_total(optim, 5) == (W, T)
    if W > 0:
        assert schedules.lr_multiplier(optim, W - 1, 5) == pytest.approx((W - 1) / W)
        assert schedules.lr_multiplier(optim, W, 5) == 1.0


def test_min_lr_frac_one_is_a_constant_schedule_and_above_one_is_refused():
    cfg = presets.build_config("listops", "s4d", "cpu-small", {"optim.min_lr_frac": "1", "optim.warmup_steps": "3"})
    assert [schedules.lr_multiplier(cfg.optim, t, 100) for t in (3, 50, 100, 150)] == [1.0] * 4
    with pytest.raises(ValueError, match=r"--optim\.min_lr_frac must be a finite number in \[0, 1\], got 1\.5"):
        presets.build_config("listops", "s4d", "cpu-small", {"optim.min_lr_frac": "1.5"})


def test_memory_estimate_counts_two_optimizer_tensors_per_trainable_parameter():
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 3))
    model.register_buffer("scale", torch.ones(5))
    model[0].weight.requires_grad_(False)  # frozen: AdamW keeps no state for it

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, lengths=None):
            return self.inner(x).mean(1)

    est = memory.tensor_estimate(Wrapped(), seq_shape=(7,), device=torch.device("cpu"), amp=False)
    trainable = (6 * 3 + 3) * 4  # Linear weight and bias, float32
    assert est.optimizer == 2 * trainable
    assert est.params == (11 * 6 + 6 * 3 + 3 + 5) * 4


@pytest.mark.slow
def test_two_process_resume_restores_each_ranks_random_state(tmp_path):
    """gloo, 2 processes: steps 1-2, checkpoint, resume with 2 processes to step 4 == an uninterrupted
    4-step run, bit for bit. Dropout makes every rank's random stream matter, and DDP averages the
    ranks' gradients, so a rank resumed with another rank's state would change the weights."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    data = write_fixtures(tmp_path / "data", "listops")
    env = dict(os.environ, PYTHONPATH=str(REPO), SSMKIT_DISABLE_TRITON="1", OMP_NUM_THREADS="1")

    def run(out, *extra):
        argv = ["--task", "listops", "--model", "s4d", "--data-dir", str(data), "--out", str(out), *TINY,
                "--data.batch_size=2", "--model.ssm.dropout=0.3", *extra]
        done = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "experiments.lra.train", *argv], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr

    run(tmp_path / "full", "--max-steps", "4")
    run(tmp_path / "cut", "--max-steps", "2")
    rng = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    run(tmp_path / "cut", "--max-steps", "4", "--resume")
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert full["state"]["step"] == cut["state"]["step"] == 4
    for name, value in full["model"].items():
        assert torch.equal(value, cut["model"][name]), name
    for a, b in zip(full["rng"], cut["rng"]):
        assert torch.equal(a["torch"], b["torch"])


def test_memory_estimate_runs_for_an_s4_dplr_model_and_leaves_its_length_alone():
    """The estimate runs the model on fake tensors, which cannot be read as Python numbers; the S4
    layer's length is such a number (a buffer). The probe must still work, and the model's own l_max
    must stay what the trainer set, not the probe's length."""
    from experiments.lra import models

    cfg = presets.build_config("listops", "s4", "cpu-small", {"model.d_model": "16", "model.n_layers": "1"})
    model = models.build_model(cfg, n_classes=10, vocab_size=16)
    layers = [m for m in model.modules() if hasattr(m, "fixed_l_max")]
    assert layers
    before = [m.l_max for m in layers]
    est = memory.tensor_estimate(model, seq_shape=(37,), device=torch.device("cpu"), amp=False)
    assert est.step_1 > 0
    assert [m.l_max for m in layers] == before


def test_resume_accepts_a_checkpoint_written_before_a_field_existed():
    """A field added after a checkpoint was written (e.g. train.strategy) counts as its default;
    set to anything else it is still a difference that refuses the resume."""
    from experiments.lra import checkpoint

    cfg = presets.build_config("listops", "s4d", "cpu-small", {})
    now = cfg.to_dict()
    old = cfg.to_dict()
    del old["train"]["strategy"]
    defaults = {k: v for k, v in config.Config().to_dict().items() if k in ("data", "model", "optim", "train")}
    checkpoint.check_config(old, now, defaults=defaults)
    now["train"]["strategy"] = "fsdp"
    with pytest.raises(ValueError, match=r"train\.strategy: 'ddp' -> 'fsdp'"):
        checkpoint.check_config(old, now, defaults=defaults)
    with pytest.raises(ValueError, match=r"train\.strategy: \(absent\) -> 'fsdp'"):
        checkpoint.check_config(old, now)
