"""LRA with the selective layers: `--model mamba` / `--model mamba2` configs, causality, model build, one step."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from experiments.lra import config, presets, train
from experiments.lra.data.fixtures import write_fixtures
from experiments.lra.models import build_model
from ssm.config import Mamba2Config, MambaConfig
from ssm.layers.mamba import Mamba
from ssm.layers.mamba2 import Mamba2

SELECTIVE = ["mamba", "mamba2"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")


@pytest.mark.parametrize("model", SELECTIVE)
@pytest.mark.parametrize("preset", config.PRESETS)
def test_presets_are_causal_and_valid_for_every_task(model, preset):
    for task in config.TASKS:
        cfg = presets.preset_config(task, model, preset)
        assert cfg.model.bidirectional is False and cfg.model.pos == "none"
        assert cfg.model.block.prenorm is True and cfg.model.block.d_ff is None
    cfg = presets.preset_config("listops", model, "cpu-small")
    assert isinstance(cfg.model.mamba, MambaConfig) and isinstance(cfg.model.mamba2, Mamba2Config)
    if model == "mamba2":
        assert (cfg.model.mamba2.d_state, cfg.model.mamba2.headdim, cfg.model.mamba2.chunk_size) == (64, 16, 64)


@pytest.mark.parametrize("model", SELECTIVE)
def test_bidirectional_true_is_refused_with_the_fix(model):
    with pytest.raises(ValueError, match=rf"--model {model} is causal only.*--model.bidirectional=false"):
        presets.build_config("listops", model, "cpu-small", {"model.bidirectional": "true"})


def test_selective_settings_are_validated_naming_the_field():
    with pytest.raises(ValueError, match=r"--model.mamba2.headdim=48 must divide d_ssm = 128"):
        presets.build_config("listops", "mamba2", "cpu-small", {"model.mamba2.headdim": "48"})
    with pytest.raises(ValueError, match=r"--model.mamba2.ngroups=3 must divide the number of heads 8"):
        presets.build_config("listops", "mamba2", "cpu-small", {"model.mamba2.ngroups": "3"})
    with pytest.raises(ValueError, match=r"--model.mamba.d_state must be an integer >= 1, got 0"):
        presets.build_config("listops", "mamba", "cpu-small", {"model.mamba.d_state": "0"})
    with pytest.raises(ValueError, match=r"--model.block.d_ff must be None for --model mamba"):
        presets.build_config("listops", "mamba", "cpu-small", {"model.block.d_ff": "32"})
    with pytest.raises(ValueError, match=r"--model.pos=rope needs --model transformer"):
        presets.build_config("listops", "mamba", "cpu-small", {"model.pos": "rope"})
    with pytest.raises(ValueError, match=r"unknown field --model.mamba2.d_stat"):
        presets.build_config("listops", "mamba2", "cpu-small", {"model.mamba2.d_stat": "8"})


@pytest.mark.parametrize("model,cls", [("mamba", Mamba), ("mamba2", Mamba2)])
def test_nested_overrides_reach_the_layers(model, cls):
    cfg = presets.build_config("listops", model, "cpu-small", {
        f"model.{model}.d_state": "8", "model.d_model": "32", "model.n_layers": "2"})
    net = build_model(cfg, max_len=40)
    layers = [b.layer for b in net.backbone.blocks]
    assert len(layers) == 2 and all(isinstance(layer, cls) and layer.config.d_state == 8 for layer in layers)
    x = torch.randint(0, 10, (3, 40))
    lengths = torch.tensor([40, 17, 5])
    with torch.no_grad():
        logits = net(x, lengths=lengths)
        alone = net(x[1:2, :17], lengths=torch.tensor([17]))
    assert logits.shape == (3, config.task_info("listops").n_classes) and bool(torch.isfinite(logits).all())
    # causal layers, padding on the right: a padded row equals the same row without its padding
    torch.testing.assert_close(logits[1:2], alone, rtol=1e-5, atol=1e-5)


def test_config_round_trips_through_a_checkpoint_dict():
    cfg = presets.build_config("listops", "mamba2", "cpu-small", {"model.mamba2.d_state": "32"})
    back = config.config_from_dict(cfg.to_dict())
    assert back.model.mamba2 == cfg.model.mamba2 and back.model_name == "mamba2"
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("model", SELECTIVE)
def test_one_training_step_on_the_listops_fixture(model, tmp_path):
    data = write_fixtures(tmp_path / "data", "listops")
    out = tmp_path / "run"
    res = train.main(["--task", "listops", "--model", model, "--data-dir", str(data), "--out", str(out),
                      "--max-steps", "1", "--model.d_model=16", "--model.n_layers=1", "--data.batch_size=2",
                      "--train.progress=false", "--train.log_every=1"])
    assert res["steps"] == 1 and math.isfinite(res["test_loss"]) and 0.0 <= res["test_acc"] <= 1.0
