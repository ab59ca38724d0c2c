"""`python -m experiments.bench.memory_defaults`: one case in a fresh process with default malloc."""
import pytest

from experiments.bench import memory_defaults


def test_a_tiny_case_runs_in_a_fresh_process_and_reports_each_call():
    case = {"layer": "s4d", "B": 1, "H": 8, "N": 4, "L": 64, "threads": 1, "mode": "fwdbwd", "calls": 2,
            "warmup_L": 16}
    res = memory_defaults.run_case(case, timeout_s=300)
    assert res["status"] == "OK", res
    assert len(res["mem_mb"]) == len(res["time_s"]) == 2
    assert all(t > 0 for t in res["time_s"]) and res["rss_after_mb"] > 0


def test_help():
    with pytest.raises(SystemExit) as e:
        memory_defaults.main(["--help"])
    assert e.value.code == 0
