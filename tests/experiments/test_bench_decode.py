"""The decoding benchmark (`python -m experiments.bench --decode`): smoke run, prefill, the step
check before timing, the floor, targets."""
import json

import pytest
import torch

from experiments.bench import decode
from experiments.bench.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decode_smoke_writes_table_and_json(tmp_path, capsys):
    out_json, out_md = tmp_path / "decode.json", tmp_path / "decode.md"
    rc = main(["--decode", "--smoke", "--device", "cpu", "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "## decoding" in text and "## targets" in text
    data = json.loads(out_json.read_text())
    assert data["header"]["command"].startswith("python -m experiments.bench --decode")
    rows = data["results"]
    assert {(r["layer"], r["B"], r["P"]) for r in rows} == {
        (layer, B, P) for layer in decode.DECODE_LAYERS for B in (1, 2) for P in (16, 32)}
    for r in rows:
        assert r["status"] == "OK", r
        assert r["steps"] == 2 and len(r["times_s"]) == 2 and r["median_s"] > 0 and r["cpu_median_s"] >= 0
        assert r["tokens_per_s"] == pytest.approx(r["B"] / r["median_s"])
        assert r["x_floor"] == pytest.approx(r["median_s"] / r["floor_s"]) and r["bandwidth_bytes_per_s"] > 0
        assert r["x_floor_cpu"] == pytest.approx(r["cpu_median_s"] / r["floor_cpu_s"])
    md = out_md.read_text()
    assert "| layer | B | P=16 | P=32 |" in md and "| s4d | 1 |" in md and "| mamba2 | 2 |" in md
    assert "x floor" in md and "measured memory bandwidth" in md


def test_prefilled_static_kv_cache_has_p_entries_and_grows_by_one_per_step():
    cfg = dict(decode.SMOKE, positions=[16])
    model = decode.build_model("transformer", cfg, device="cpu")
    gen = torch.Generator().manual_seed(0)
    state = decode.prefilled_state(model, "transformer", 2, 16, device="cpu", gen=gen, room=4)
    assert all(s.k.shape == (2, cfg["n_heads"], 20, cfg["d_model"] // cfg["n_heads"]) and s.filled == 16
               for s in state)
    tok = torch.zeros(2, dtype=torch.long)
    step = decode.step_function(model, cfg)
    out, new = step(tok, state)
    empty, _ = step(tok, decode.empty_state(model, "transformer", 2, 4, device="cpu"))
    assert all(s.filled == 17 and int(s.pos[0, 16]) == 16 for s in new)
    assert not torch.allclose(out, empty)   # the step attends to the prefilled cache


def test_transformer_case_over_the_memory_cap_is_skipped_with_reason():
    cfg = dict(decode.SMOKE)
    rows = decode.run_series("transformer", 2, cfg, device="cpu", mem_cap_bytes=1000)
    assert [r["P"] for r in rows] == [16, 32]
    assert all(r["status"] == "SKIPPED" and "KV cache" in r["reason"] for r in rows)
    assert all(r["status"] == "OK" for r in decode.run_series("s4d", 2, cfg, device="cpu", mem_cap_bytes=1000))
    assert decode.kv_cache_bytes(dict(d_model=256, n_layers=4), 16, 65536) == 2 * 16 * 65536 * 256 * 4 * 4


def test_a_model_whose_step_disagrees_is_never_timed(monkeypatch):
    def wrong_step(model, cfg):
        def step(tok, state):
            out, state = model.step(tok, state)
            return out + 1e-2, state
        return step

    def no_timing(*a, **k):
        raise AssertionError("timed a model whose step is wrong")

    monkeypatch.setattr(decode, "step_function", wrong_step)
    monkeypatch.setattr(decode, "time_decode", no_timing)
    rows = decode.run_series("s4d", 1, dict(decode.SMOKE), device="cpu", mem_cap_bytes=2**30)
    assert [r["status"] for r in rows] == ["FAILED", "FAILED"]
    assert all("disagrees with the forward pass" in r["reason"] for r in rows)


def test_the_eager_step_passes_the_check_too():
    cfg = dict(decode.SMOKE, step="eager")
    model = decode.build_model("s4d", cfg, device="cpu")
    step = decode.step_function(model, cfg)
    assert step == model.step and decode.check_step(model, "s4d", step, cfg, device="cpu") is None


def test_traffic_counts_weights_state_and_cache():
    cfg = dict(decode.SMOKE)
    s4d = decode.build_model("s4d", cfg, device="cpu")
    H, n = cfg["d_model"], cfg["d_state"] // 2
    weights = sum(p.numel() * 4 for name, p in s4d.named_parameters() if not name.startswith("encoder"))
    state = cfg["n_layers"] * 3 * H * n * 8                          # complex64 (B, H, N/2) per layer
    assert decode.traffic_bytes(s4d, "s4d", cfg, 3, 999) == weights + 3 * H * 4 + 2 * state
    tr = decode.build_model("transformer", cfg, device="cpu")
    w = decode.traffic_bytes(tr, "transformer", cfg, 1, 0)
    assert decode.traffic_bytes(tr, "transformer", cfg, 1, 100) - w == decode.kv_cache_bytes(cfg, 1, 100)
    bw = decode.measure_bandwidth("cpu", 2**20)
    assert min(bw) > 1e8 and decode.measure_bandwidth("cpu", 2**20) == bw   # measured once per process


def _row(layer, B, P, ms, cpu_ms, **extra):
    return {"layer": layer, "B": B, "P": P, "status": "OK", "median_s": ms / 1e3, "cpu_median_s": cpu_ms / 1e3,
            "tokens_per_s": B / (ms / 1e3), **extra}


def test_targets_report_flatness_the_16k_ratio_the_s4d_budget_and_the_cache_floor():
    rows = [_row("s4d", 1, 1024, 1.0, 1.0), _row("s4d", 1, 16384, 1.2, 1.0),
            _row("transformer", 1, 16384, 12.5, 9.0, cache_read_s=5e-3, cache_read_cpu_s=5e-3), _row("s4d", 16, 1024, 1.0, 1.0),
            _row("s4d", 16, 16384, 2.0, 1.1), _row("transformer", 16, 16384, 9.0, 12.1, cache_read_s=6e-3,
                                                                      cache_read_cpu_s=6e-3)]
    lines = decode.targets(rows)
    expect = [("s4d B=1 flat", "(wall): 1.20: PASS"), ("s4d B=1 flat", "(cpu): 1.00: PASS"),
              ("B=1 P=16384", "(wall): 10.42x: PASS"), ("B=1 P=16384", "(cpu): 9.00x: MISS"),
              ("s4d B=1 per token (wall", "1.2 ms (<= 0.3 ms): MISS"),
              ("s4d B=1 per token (cpu", "1 ms (<= 0.3 ms): MISS"),
              ("transformer B=1 P=16384 vs reading its KV cache once (wall)", "2.50x (<= 2x): MISS"),
              ("transformer B=1 P=16384 vs reading its KV cache once (cpu)", "1.80x (<= 2x): PASS"),
              ("s4d B=16 flat", "(wall): 2.00: MISS"), ("s4d B=16 flat", "(cpu): 1.10: PASS"),
              ("B=16 P=16384", "(wall): 4.50x: MISS"), ("B=16 P=16384", "(cpu): 11.00x: PASS"),
              ("transformer B=16 P=16384 vs reading its KV cache once (wall)", "1.50x (<= 2x): PASS"),
              ("transformer B=16 P=16384 vs reading its KV cache once (cpu)", "2.02x (<= 2x): MISS")]
    for head, tail in expect:
        assert any(x.startswith(("s4d vs transformer " + head, head)) and x.endswith(tail) for x in lines), (head, tail)
    assert len(lines) == len(expect)
