"""Synthetic runner on the LRA trainer: training per task, metrics, resume, sweep, report, CLI errors."""
import json

import pytest

from experiments.synthetic import report, run, sweep
from experiments.synthetic.config import MODELS
from experiments.synthetic.data import TASKS, SyntheticDataset


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # The suite turns the Triton interpreter on for the kernel tests; training runs use the
    # plain PyTorch paths (the interpreter would take minutes per step).
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")


def _records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train(tmp_path, task, *extra, model="s4d", name="run"):
    out = tmp_path / name
    args = ["--task", task, "--model", model, "--preset", "smoke", "--out", str(out), "--data.n_train=96",
            "--optim.lr=0.01", *extra]
    return run.main(args), out


@pytest.mark.parametrize("task", list(TASKS))
def test_training_lowers_the_loss_and_writes_complete_metrics(tmp_path, task):
    # S_5 has 120 classes: a larger step moves its loss within the 12 steps.
    result, out = _train(tmp_path, task, *(["--optim.lr=0.05"] if task == "s5" else []))
    recs = _records(out)
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))  # 96 samples, batch 8: 12 steps, a record each
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first, (first, last)
    assert [r["step"] for r in recs if r["split"] == "val"] == [12]
    assert [r["split"] for r in recs][-1] == "test"
    assert result["completed"] and result["steps"] == 12 and 0.0 <= result["test_acc"] <= 1.0
    stored = json.loads((out / "result.json").read_text())
    for key in ("test_acc", "state_bytes", "lengths", "cpu_seconds", "task_config", "n_params"):
        assert key in stored
    # Accuracy counts labelled positions only: n_test is the number of test targets that are not -100.
    cfg = run.make_config(task, "s4d", "smoke", {})
    test_split = SyntheticDataset(cfg.task_config, cfg.data.n_test, seed=cfg.train.seed, split="test")
    assert stored["n_test"] == sum(int((y != -100).sum()) for _, y in test_split)


@pytest.mark.parametrize("model", [m for m in MODELS if m != "s4d"])
def test_every_model_family_trains_a_step_and_counts_its_state(tmp_path, model):
    result, out = _train(tmp_path, "mqar", "--max-steps", "2", model=model)
    assert result["steps"] == 2 and not result["completed"]
    assert result["state_bytes"] > 0
    if model == "transformer":  # KV cache of 2 layers after seq_len tokens: 2 * L * d_model floats + 9 B/token
        d, length = result["d_model"], result["seq_len"]
        assert result["state_bytes"] == 2 * (2 * length * d * 4 + 9 * length)


def test_resume_continues_the_run_exactly(tmp_path):
    full, _ = _train(tmp_path, "parity", name="full")
    part, out = _train(tmp_path, "parity", "--max-steps", "5", name="split")
    assert part["steps"] == 5 and (out / "last.pt").is_file()
    with pytest.raises(ValueError, match="task.seq_len"):  # a different task knob is refused, not resumed
        run.main(["--task", "parity", "--model", "s4d", "--preset", "smoke", "--out", str(out), "--resume",
                  "--data.n_train=96", "--optim.lr=0.01", "--task.seq_len=17"])
    with pytest.raises(FileExistsError):
        _train(tmp_path, "parity", name="split")
    resumed, _ = _train(tmp_path, "parity", "--resume", name="split")
    assert resumed["completed"] and resumed["steps"] == full["steps"]
    assert resumed["test_acc"] == full["test_acc"] and resumed["test_loss"] == pytest.approx(full["test_loss"])
    a = [r["loss"] for r in _records(tmp_path / "full") if r["split"] == "train"]
    b = [r["loss"] for r in _records(out) if r["split"] == "train"]
    assert a == pytest.approx(b)


def test_sweep_skips_finished_runs_and_report_writes_tables_and_plots(tmp_path):
    entries = sweep.smoke_grid(tasks=("parity", "induction"), models=("s4d",))
    entries[1] = sweep.Entry(entries[1].group, entries[1].name, "induction", "s4d", preset="smoke",
                             overrides={"data.eval_lengths": "1,2"})
    first = sweep.run_sweep(entries, tmp_path, progress=False)
    assert set(first.values()) == {"done"}
    for e in entries:
        run_dir = tmp_path / "runs" / e.group / e.name
        assert (run_dir / "result.json").is_file() and not (run_dir / "last.pt").exists()
    again = sweep.run_sweep(entries, tmp_path, progress=False)
    assert set(again.values()) == {"skipped"}
    out = report.write_report(tmp_path)
    names = {p.name for p in out["written"]}
    assert {"results.json", "results.md", "state_parity.png", "state_induction.png",
            "induction_lengths.png"} <= names
    assert "| S4D |" in out["markdown"] and "2x" in out["markdown"]


def test_cli_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["--help"])
    assert e.value.code == 0 and "--task" in capsys.readouterr().out
    run.main(["--task", "mqar", "--model", "mamba2", "--print-config", "--task.num_kv_pairs=8"])
    text = capsys.readouterr().out
    assert "task.num_kv_pairs = 8" in text and "model.layer.headdim = 16" in text


@pytest.mark.parametrize("bad,word", [
    ("--model.ssm.d_state=abc", "d_state"),
    ("--task.num_kv_pairs=100", "num_kv_pairs"),
    ("--task.nope=1", "nope"),
    ("--data.eval_lengths=1,x", "eval_lengths"),
    ("--optim.lr=-1", "optim.lr"),
    ("--model.ssm.bidirectional=true", "causal"),
    ("--data.batch_size=0", "data.batch_size"),
])
def test_bad_config_errors_before_any_work(tmp_path, capsys, bad, word):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        run.main(["--task", "mqar", "--model", "s4d", "--out", str(out), bad])
    assert e.value.code == 2 and word in capsys.readouterr().err
    assert not out.exists()


def test_bad_layer_setting_is_refused_by_the_layer_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.main(["--task", "mqar", "--model", "mamba2", "--out", str(tmp_path / "x"), "--model.mamba2.headdim=7"])
    assert "headdim" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="init"):  # refused by the layer when the model is built
        run.main(["--task", "mqar", "--model", "s4d", "--out", str(tmp_path / "y"), "--model.ssm.init=nope"])
    assert not (tmp_path / "y").exists()
