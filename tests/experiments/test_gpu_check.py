"""`python -m experiments.gpu_check`: the plan, argument handling, the clear failure without CUDA,
step results and the written report (no GPU needed: the steps are faked)."""
import json
import sys

import pytest
import torch

from experiments import gpu_check
from experiments.bench.__main__ import parse_args as bench_args


def test_dry_run_prints_the_plan_within_eight_minutes(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "SSMKIT_TEST_COMPILED=1" in text and "pytest tests/kernels" in text
    assert "--amp bf16" in text and "--amp none" in text and "--op" in text
    assert sum(gpu_check.TIMEOUTS.values()) <= 8 * 60 - 30
    assert f"total time limit: {sum(gpu_check.TIMEOUTS.values())} s" in text
    assert not (tmp_path / "out").exists()                             # a dry run writes nothing


def test_benchmark_steps_are_valid_runner_commands(tmp_path):
    for full in (False, True):
        for step in gpu_check.plan(tmp_path, full=full, steps=list(gpu_check.STEPS)):
            if step["name"] == "tests-compiled":
                assert step["env"] == {"SSMKIT_TEST_COMPILED": "1", "TRITON_INTERPRET": "0"}
                continue
            assert step["cmd"][1:3] == ["-m", "experiments.bench"]
            args = bench_args(step["cmd"][3:])
            assert args.device == "cuda" and args.json.endswith(".json") and args.markdown.endswith(".md")
            if step["name"] == "ops":
                assert args.op and not args.layer
            else:
                assert args.layer and not args.op and args.amp == ("bf16" if step["name"].endswith("bf16") else "none")
            assert (step["timeout_s"] is None) == full


def test_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == 2 and "out_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["out", "--steps", "benchmarks-everything"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_without_cuda_it_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "NVIDIA GPU" in err
    assert not (tmp_path / "gpu_check.json").exists()


def test_run_step_reports_pass_fail_and_timeout(tmp_path):
    def step(code, timeout=30):
        return {"name": "x", "cmd": [sys.executable, "-c", code], "env": {"FOO": "1"}, "timeout_s": timeout}

    ok = gpu_check.run_step(step("import os; print('ok', os.environ['FOO'])"), tmp_path)
    assert ok["status"] == "PASS" and ok["returncode"] == 0 and "ok 1" in ok["output_tail"]
    bad = gpu_check.run_step(step("import sys; print('boom'); sys.exit(3)"), tmp_path)
    assert bad["status"] == "FAIL" and bad["returncode"] == 3 and "boom" in bad["output_tail"]
    slow = gpu_check.run_step(step("import time; print('started', flush=True); time.sleep(30)", timeout=1), tmp_path)
    assert slow["status"] == "TIMEOUT" and slow["returncode"] is None


def test_report_is_written_after_each_step_and_failures_set_the_exit_code(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H200")
    done = []

    def fake_run(step, cwd):
        done.append(step["name"])
        if step["name"] == "ops":
            (tmp_path / "ops.md").write_text("| op | time |\n")
        status = "FAIL" if step["name"] == "layers-bf16" else "PASS"
        return {"name": step["name"], "command": " ".join(step["cmd"]), "env": step["env"],
                "timeout_s": step["timeout_s"], "status": status, "returncode": 0 if status == "PASS" else 1,
                "wall_s": 1.0, "output_tail": "12 passed | fine\n"}

    monkeypatch.setattr(gpu_check, "run_step", fake_run)
    assert gpu_check.main([str(tmp_path)]) == 1
    assert done == list(gpu_check.STEPS)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["header"]["device_name"] == "Fake H200" and [s["status"] for s in data["steps"]] == [
        "PASS", "PASS", "PASS", "FAIL"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| layers-bf16 | FAIL |" in md and "## ops" in md and "12 passed / fine" in md
    monkeypatch.setattr(gpu_check, "run_step", lambda step, cwd: {**fake_run(step, cwd), "status": "PASS"})
    assert gpu_check.main([str(tmp_path), "--steps", "ops"]) == 0
