"""The benchmark runner: smoke mode end to end, the correctness guard, the numbers."""
import json
import os
import subprocess
import sys

import pytest

from experiments.bench import ops, report
from experiments.bench.__main__ import _predict_too_slow, parse_args
from experiments.bench.timing import summarize, time_fn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_writes_table_json_and_plot(tmp_path):
    out_json, out_png, out_md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--smoke", "--json", str(out_json),
                           "--plot", str(out_png), "--markdown", str(out_md)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("# device: cpu")
    for section in ("## operators", "## layers", "median ms"):
        assert section in proc.stdout
    data = json.loads(out_json.read_text())
    for key in ("device", "torch", "triton", "commit", "date", "command"):
        assert data["header"][key]
    rows = data["results"]
    assert {r["op"] for r in rows if r["kind"] == "op"} == set(ops.OPS)
    assert {r["layer"] for r in rows if r["kind"] == "layer"} == {"s4d", "s4", "attention", "transformer"}
    assert not [r for r in rows if r["status"] not in ("OK", "SKIPPED")]
    for r in rows:
        if r["status"] == "SKIPPED":
            assert r["reason"]
        elif r["kind"] == "op":
            assert r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["check"]["out"]
            assert r["flops"] > 0 and r["bytes"] > 0
    ok_providers = {r["provider"] for r in rows if r["kind"] == "op" and r["status"] == "OK"}
    assert {"torch", "plain", "compile"} <= ok_providers
    # the first layer case ran in a fresh process and reports its RSS growth
    first = next(r for r in rows if r["kind"] == "layer")
    assert first["status"] == "OK" and "rss_base_bytes" in first and first["mem_bytes"] >= 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out_md.read_text()
    assert "| op | H | N | provider | mode |" in md and "| layer | B | H | N | mode |" in md


def _case(provider="plain", mode="fwdbwd", op="vandermonde"):
    return dict(kind="op", op=op, provider=provider, H=3, N=6, L=17, mode=mode, device="cpu", repeats=2,
                budget_s=0.01, allow_interpreter=False, mem_cap_bytes=2**30)


@pytest.mark.parametrize("wrong", ["forward", "gradient"])
def test_guard_fails_wrong_provider_and_never_times_it(monkeypatch, wrong):
    calls = []

    def bad(inp):
        calls.append(1)
        x = inp["x"]
        if wrong == "gradient":  # same values, half the gradient w.r.t. x
            x = x.detach() + 0.5 * (x - x.detach())
        out = ops.plain_call("vandermonde", {**inp, "x": x})
        return out * (1 + 1e-3) if wrong == "forward" else out

    monkeypatch.setattr(ops, "provider", lambda *a, **k: bad)
    res = ops.run_op_case(_case())
    assert res["status"] == "FAILED"
    assert ("grad_x" if wrong == "gradient" else "out") in res["reason"]
    assert "median_s" not in res and len(calls) == 1


@pytest.mark.parametrize("op", ops.OPS)
def test_plain_provider_passes_its_own_check(op):
    res = ops.run_op_case(_case(op=op))
    assert res["status"] == "OK", res.get("reason")
    assert set(res["check"]) == {"out"} | {f"grad_{k}" for k in ops.ROW_DIM[op]}


def test_unavailable_provider_is_skipped_with_reason():
    res = ops.run_op_case(_case(provider="triton"))  # CPU without --smoke: never the interpreter
    assert res["status"] == "SKIPPED" and res["reason"]
    res = ops.run_op_case({**_case(), "mem_cap_bytes": 10})
    assert res["status"] == "SKIPPED" and "GiB" in res["reason"]


def test_counts_follow_the_documented_formulas():
    H, N, L = 4, 8, 32
    assert ops.counts("vandermonde", H, N, L, "fwd") == (8.0 * H * 4 * L, 16.0 * H * 4 + 4.0 * H * L)
    assert ops.counts("vandermonde", H, N, L, "fwdbwd")[0] == 24.0 * H * 4 * L
    assert ops.counts("cauchy", H, N, L, "fwd")[0] == 2.0 * H * 4 * 17 * (8 + 8 * 4)
    assert ops.device_peaks("NVIDIA H100 80GB HBM3") == (67e12, 3.35e12)
    assert ops.device_peaks("cpu") is None


def test_timing_summary_and_budget():
    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median_s"], s["p20_s"], s["p80_s"], s["repeats"]) == (3.0, 2.0, 4.0, 5)
    n = []
    r = time_fn(lambda: n.append(sum(range(20000))), device="cpu", repeats=50, budget_s=0.0)
    assert r["repeats"] == 1 and len(n) == 2  # one warm-up, one timed call


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0 and "--smoke" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--op", "nope"])
    args = parse_args(["--op"])
    assert args.op == list(ops.OPS) and args.layer == []


def test_tables_and_targets_report_missing_rows():
    rows = [{"kind": "op", "op": "cauchy", "provider": "plain", "mode": "fwd", "H": 1, "N": 2, "L": 8,
             "status": "FAILED", "reason": "out: error 1e-1 > budget 1e-6"}]
    assert "FAILED: out: error" in report.op_table(rows, gpu=True)
    assert all("not measured" in t for t in report.targets([], device="cpu"))
    ok = [{"kind": "layer", "layer": lay, "mode": "fwdbwd", "B": 1, "H": 256, "N": 64, "L": 8192, "status": "OK",
           "median_s": t} for lay, t in (("s4d", 0.1), ("attention", 2.0))]
    assert any("20.0x" in t and t.endswith("MET") for t in report.targets(ok, device="cpu"))


def test_slow_series_are_skipped_by_prediction():
    pts = [(1024, 0.5), (2048, 2.0)]  # quadratic growth: 8 s at 4096, 32 s at 8192
    assert _predict_too_slow(pts, 4096, 10.0) is None
    assert "32 s" in _predict_too_slow(pts, 8192, 10.0)
    assert _predict_too_slow([], 8192, 10.0) is None


@pytest.mark.slow  # KeOps compiles each formula and gradient on first use (~2 min on 2 cores)
@pytest.mark.parametrize("op", ["vandermonde", "cauchy"])
def test_pykeops_provider_passes_the_guard(op):
    pytest.importorskip("pykeops")
    res = ops.run_op_case(_case(provider="pykeops", op=op))
    assert res["status"] == "OK", res.get("reason")
