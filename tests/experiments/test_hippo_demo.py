"""`python -m experiments.hippo_demo` at tiny size: table, JSON and PNG are written and sensible."""
import json

import pytest
import torch

from experiments import hippo_demo


def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    result = hippo_demo.main(["--out", str(out), "--length", "300", "--N", "4", "32"])
    printed = capsys.readouterr().out
    assert (out / "hippo_demo.png").stat().st_size > 10_000
    assert (out / "hippo_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "errors.md").read_text()
    assert table.strip() in printed
    rows = [r for r in table.splitlines() if r.startswith("| ") and "signal" not in r]
    assert len(rows) == len(hippo_demo.SIGNALS) * 4  # every signal x every measure
    data = json.loads((out / "errors.json").read_text())
    assert set(data["rmse"]) == set(hippo_demo.SIGNALS)
    for sname in ("smooth", "chirp"):  # smooth signals: more state -> smaller LegT/LegS error
        for m in ("legt", "legs"):
            e = result["errors"][sname][m]
            assert e[32] < 0.5 * e[4], (sname, m, e)


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        hippo_demo.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--length", "--N", "--measures", "--method", "--theta"):
        assert flag in text


def test_demo_bad_args(tmp_path):
    with pytest.raises(SystemExit):
        hippo_demo.main(["--out", str(tmp_path), "--theta", "2"])
    with pytest.raises(SystemExit):
        hippo_demo.main(["--out", str(tmp_path), "--measures", "legendre"])


def test_signals_deterministic():
    a = hippo_demo.make_signals(50, seed=3)
    b = hippo_demo.make_signals(50, seed=3)
    assert set(a) == set(hippo_demo.SIGNALS)
    for k in a:
        assert a[k].shape == (50,) and torch.equal(a[k], b[k])
