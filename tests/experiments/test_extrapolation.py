"""The length-extrapolation study: task rule, RoPE variant configs, a tiny end-to-end run + resume."""
import json

import pytest
import torch

from experiments import extrapolation as ex


def test_task_rule_is_fixed_lag_copy():
    cfg = ex.Config(lag=3, vocab=5)
    x, y = ex.make_batch(cfg, 4, 20, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 20) and int(x.min()) >= 0 and int(x.max()) < 5
    assert (y[:, :3] == -100).all()
    assert torch.equal(y[:, 3:], x[:, :-3])


def test_rope_variant_scalings():
    cfg = ex.Config(L_train=64, lag=8)
    assert ex.rope_scaling("rope", cfg, 256) is None
    assert ex.rope_scaling("rope-linear", cfg, 256) == {"type": "linear", "factor": 4.0}
    assert ex.rope_scaling("rope-ntk", cfg, 128) == {"type": "ntk", "factor": 2.0}
    assert ex.rope_scaling("rope-yarn", cfg, 512)["original_max_position_embeddings"] == 64
    assert ex.rope_scaling("rope-rerope", cfg, 512) == {"type": "rerope", "window": 16}
    with pytest.raises(ValueError):
        ex.rope_scaling("rope-bogus", cfg, 64)
    with pytest.raises(ValueError):
        ex.build("mamba", cfg)


def test_tiny_run_and_resume(tmp_path):
    args = ["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--backend", "torch"]
    first = ex.main(args)
    names = ["s4d", "s4", *ex.ROPE_EVAL, "alibi"]
    assert list(first["results"]) == names
    assert first["lengths"] == [16, 32]
    for per_len in first["results"].values():
        for res in per_len.values():
            assert 0.0 <= res["acc"] <= 1.0 and res["loss"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["rope-yarn"]["32"]["acc"] == first["results"]["rope-yarn"][32]["acc"]
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    assert (tmp_path / "extrapolation.png").read_bytes()[:4] == b"\x89PNG"
    # at 1x (no scaling needed) every RoPE variant except ReRoPE is the plain model
    r = first["results"]
    assert r["rope-linear"][16] == r["rope-ntk"][16] == r["rope-yarn"][16] == r["rope"][16]
    # a rerun with the same config reuses the checkpoints and reproduces the numbers
    second = ex.main(args)
    assert second["results"] == first["results"]
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "loaded_checkpoint" for e in events) == len(ex.TRAINED)


def test_bad_cli_arguments():
    with pytest.raises(SystemExit):
        ex.main(["--preset", "tiny", "--out", "/nonexistent/x", "--models", "rope,bogus"])
    with pytest.raises(SystemExit):
        ex.main(["--preset", "tiny", "--out", "/nonexistent/x", "--lag", "16"])


@pytest.mark.slow
def test_rope_transformer_learns_the_task(tmp_path):
    cfg = ex.Config(steps=300, threads=1, models=("rope",), factors=(1,), backend="torch")
    out = ex.run(cfg, tmp_path, progress=False)
    assert out["results"]["rope"][64]["acc"] > 0.95
