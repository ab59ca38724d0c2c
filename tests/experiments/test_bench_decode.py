"""The decoding benchmark (`python -m experiments.bench --decode`): smoke run, prefill, targets."""
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
    md = out_md.read_text()
    assert "| layer | B | P=16 | P=32 |" in md and "| s4d | 1 |" in md and "| transformer | 2 |" in md


def test_prefilled_kv_cache_has_p_entries_and_grows_by_one_per_step():
    cfg = dict(decode.SMOKE, positions=[16])
    model = decode.build_model("transformer", cfg, device="cpu")
    gen = torch.Generator().manual_seed(0)
    state = decode.prefilled_state(model, "transformer", 2, 16, device="cpu", gen=gen)
    assert all(s["k"].shape == (2, cfg["n_heads"], 16, cfg["d_model"] // cfg["n_heads"]) for s in state)
    tok = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        out, new = model.step(tok, state)
        empty, _ = model.step(tok, model.default_state(2))
    assert all(s["k"].shape[2] == 17 and int(s["pos"][0, -1]) == 16 for s in new)
    assert not torch.allclose(out, empty)   # the step attends to the prefilled cache


def test_transformer_case_over_the_memory_cap_is_skipped_with_reason():
    cfg = dict(decode.SMOKE)
    rows = decode.run_series("transformer", 2, cfg, device="cpu", mem_cap_bytes=1000)
    assert [r["P"] for r in rows] == [16, 32]
    assert all(r["status"] == "SKIPPED" and "KV cache" in r["reason"] for r in rows)
    assert all(r["status"] == "OK" for r in decode.run_series("s4d", 2, cfg, device="cpu", mem_cap_bytes=1000))
    assert decode.kv_cache_bytes(dict(d_model=256, n_layers=4), 16, 65536) == 2 * 16 * 65536 * 256 * 4 * 4


def _row(layer, B, P, ms, cpu_ms):
    return {"layer": layer, "B": B, "P": P, "status": "OK", "median_s": ms / 1e3, "cpu_median_s": cpu_ms / 1e3,
            "tokens_per_s": B / (ms / 1e3)}


def test_targets_report_flatness_and_the_16k_ratio_on_both_clocks():
    rows = [_row("s4d", 1, 1024, 1.0, 1.0), _row("s4d", 1, 16384, 1.2, 1.0),
            _row("transformer", 1, 16384, 12.5, 9.0), _row("s4d", 16, 1024, 1.0, 1.0),
            _row("s4d", 16, 16384, 2.0, 1.1), _row("transformer", 16, 16384, 9.0, 12.1)]
    lines = decode.targets(rows)
    expect = [("s4d B=1 flat", "(wall): 1.20: PASS"), ("s4d B=1 flat", "(cpu): 1.00: PASS"),
              ("B=1 P=16384", "(wall): 10.42x: PASS"), ("B=1 P=16384", "(cpu): 9.00x: MISS"),
              ("s4d B=16 flat", "(wall): 2.00: MISS"), ("s4d B=16 flat", "(cpu): 1.10: PASS"),
              ("B=16 P=16384", "(wall): 4.50x: MISS"), ("B=16 P=16384", "(cpu): 11.00x: PASS")]
    for head, tail in expect:
        assert any(x.startswith(("s4d vs transformer " + head, head)) and x.endswith(tail) for x in lines), (head, tail)
    assert len(lines) == len(expect)
