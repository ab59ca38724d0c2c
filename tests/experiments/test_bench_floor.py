"""The layer floor in the benchmark: what it times, the interleaved timing, x floor / x act in the
rows, tables and targets."""
import pytest
import torch

from experiments.bench import report
from experiments.bench.layers import activation_bytes, floor_call, run_layer_case
from experiments.bench.timing import time_interleaved


def test_activation_bytes_follow_the_documented_formula():
    # K (c' H L) + y (B c H L) float32 + Linear output (B L 2H): 16 MiB + 16 MiB + 32 MiB
    assert activation_bytes("s4d", 1, 256, 16384) == 64 * 2**20
    assert activation_bytes("s4", 2, 8, 10, channels=2, bidirectional=True) == 4 * (4 * 8 * 10 + 2 * 2 * 8 * 10) + 4 * 2 * 10 * 16
    assert activation_bytes("s4d", 1, 8, 10, out_itemsize=2) == 4 * 80 + 4 * 80 + 2 * 160
    assert activation_bytes("attention", 1, 8, 10) is None


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_floor_call_runs_the_linear_and_the_ffts(monkeypatch, mode):
    calls = {"rfft": [], "irfft": [], "linear": 0}
    rfft, irfft, linear = torch.fft.rfft, torch.fft.irfft, torch.nn.functional.linear

    def count(name, fn):
        def wrapped(t, *a, **k):
            calls[name].append(tuple(t.shape))
            return fn(t, *a, **k)
        return wrapped

    def lin(*a, **k):
        calls["linear"] += 1
        return linear(*a, **k)

    monkeypatch.setattr(torch.fft, "rfft", count("rfft", rfft))
    monkeypatch.setattr(torch.fft, "irfft", count("irfft", irfft))
    monkeypatch.setattr(torch.nn.functional, "linear", lin)
    B, H, L = 2, 3, 10
    fn = floor_call("s4d", B, H, L, mode=mode, device="cpu")
    fn()
    assert calls["linear"] == 1
    F = 2 * L // 2 + 1                                   # FFT length 20 for L = 10
    want_r = [(B, H, L), (1, H, L)] + ([(B, 1, H, L)] if mode == "fwdbwd" else [])
    want_i = [(B, 1, H, F)] + ([(B, H, F), (1, H, F)] if mode == "fwdbwd" else [])
    assert calls["rfft"] == want_r and calls["irfft"] == want_i
    assert floor_call("attention", B, H, L, mode=mode, device="cpu") is None


def test_time_interleaved_alternates_and_reports_the_ratio():
    order = []
    res = time_interleaved(lambda: order.append("call"), lambda: order.append("floor"), device="cpu",
                           repeats=4, budget_s=10.0)
    assert order == ["floor"] + ["call", "floor"] * 4    # one floor warm-up, then strict alternation
    assert res["repeats"] == 4 and len(res["floor_times_s"]) == 4
    assert res["x_floor"] == pytest.approx(res["median_s"] / res["floor_median_s"])
    assert res["x_floor_cpu"] == pytest.approx(res["cpu_median_s"] / res["floor_cpu_median_s"])
    assert len(res["loadavg"]) == 3


def test_layer_case_reports_floor_and_activations_and_measures_memory_after_timing():
    events = []
    case = dict(layer="s4d", B=1, H=8, N=4, L=32, mode="fwdbwd", device="cpu", repeats=2, budget_s=10.0)
    res = run_layer_case(case, before_timing=lambda: events.append("mark"))
    assert res["status"] == "OK", res.get("reason")
    assert res["x_floor"] > 0 and res["floor_median_s"] > 0 and res["repeats"] == 2
    assert res["activation_bytes"] == activation_bytes("s4d", 1, 8, 32)
    assert events == ["mark"]


def test_table_and_targets_show_x_floor_and_x_act():
    row = {"kind": "layer", "layer": "s4d", "mode": "fwdbwd", "B": 1, "H": 256, "N": 64, "L": 16384,
           "status": "OK", "median_s": 0.6, "p20_s": 0.5, "p80_s": 0.7, "repeats": 5, "floor_median_s": 0.5,
           "x_floor": 1.2, "x_floor_cpu": 1.3, "mem_bytes": 200e6, "activation_bytes": 64 * 2**20}
    table = report.layer_table([row])
    assert "x floor" in table and "x act" in table and "1.20" in table and "2.98" in table
    lines = report.targets([row], device="cpu")
    assert any(t.startswith("s4d") and "1.20x floor" in t and t.endswith("MET") for t in lines)
    assert any(t.startswith("s4 ") and "not measured" in t for t in lines)
    slow = {**row, "x_floor": 1.7}
    assert any("1.70x floor" in t and t.endswith("MISSED") for t in report.targets([slow], device="cpu"))
    assert "1.20x floor, 2.98x act" in report.markdown({"device_name": "cpu", "torch": "t", "triton": "-",
                                                         "commit": "c", "date": "d", "command": "x"}, [row])
