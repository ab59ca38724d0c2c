"""LRA models: RoPE / ALiBi Transformer baselines train on every task (one optimizer step on the
official-format fixtures), every RoPE scaling reaches the attention layer, the Retrieval model has no
unused parameter, the heads have the configured shapes, and the SSM layer options reach S4Block."""
from __future__ import annotations

import json
import math

import pytest
import torch

from experiments.lra import config, presets
from experiments.lra import models as M
from experiments.lra.data import collate, load_task
from experiments.lra.data.fixtures import write_fixtures
from experiments.lra.tasks import task_info

TINY = {"model.d_model": "16", "model.n_layers": "1", "model.attention.n_heads": "2", "model.attention.d_mlp": "16",
        "model.ssm.d_state": "4", "data.batch_size": "4"}


@pytest.fixture(autouse=True)
def _plain_kernels(monkeypatch):
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lra_model_fixtures")
    return {task: write_fixtures(root / task, task) for task in config.TASKS}


def _batch(cfg, root):
    split = load_task(cfg.task, root, max_len=cfg.data.max_len)["train"]
    return collate([split[i] for i in range(cfg.data.batch_size)])


def _one_step(cfg, root) -> tuple[float, torch.nn.Module]:
    """Build the model, run loss + backward + AdamW step on one fixture batch; return the loss."""
    model = M.build_model(cfg)
    x, lengths, y = _batch(cfg, root)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x, lengths), y)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return loss.item(), model


def _attention_layers(model):
    from ssm.layers.attention import MultiHeadAttention

    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("task", config.TASKS)
def test_rope_and_alibi_train_on_every_task(task, pos, fixture_root):
    extra = {"data.max_len": "256"} if task == "pathx" else {}  # keep the 128x128 fixtures' attention small
    cfg = presets.build_config(task, "transformer", "cpu-small", {**TINY, "model.pos": pos, **extra})
    loss, model = _one_step(cfg, fixture_root[task])
    assert math.isfinite(loss)
    layers = _attention_layers(model)
    assert layers and all(layer.pos == pos for layer in layers)


ROPE_SCALINGS = {
    "linear": {"model.rope_factor": "2"},
    "ntk": {"model.rope_factor": "2"},
    "dynamic": {"model.rope_factor": "2"},
    "yarn": {"model.rope_factor": "4", "model.rope_params": '{"beta_fast": 16}'},
    "llama3": {"model.rope_factor": "8"},
    "longrope": {"model.rope_factor": "2", "model.rope_params": json.dumps(
        {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4})},  # head size 8: 4 frequencies
    "ntk_mixed": {"model.rope_factor": "2"},
    "rerope": {"model.rope_window": "16"},
    "leaky_rerope": {"model.rope_window": "16", "model.rope_factor": "8"},
}


def test_every_rope_scaling_is_covered():
    from ssm.layers.rope import ROPE_TYPES

    assert set(ROPE_SCALINGS) == set(ROPE_TYPES)


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
def test_rope_scaling_reaches_attention_and_trains(scaling, fixture_root):
    over = {**TINY, "model.pos": "rope", "model.rope_scaling": scaling, **ROPE_SCALINGS[scaling]}
    cfg = presets.build_config("listops", "transformer", "cpu-small", over)
    loss, model = _one_step(cfg, fixture_root["listops"])
    assert math.isfinite(loss)
    want = config.rope_scaling_dict(cfg)
    for layer in _attention_layers(model):
        assert layer.rope_scaling["type"] == scaling
        assert all(layer.rope_scaling[k] == v for k, v in want.items())
    if scaling in ("yarn", "dynamic", "llama3", "longrope"):  # training length: ListOps 2000 + the model's pooling
        assert want["original_max_position_embeddings"] == 2000


def test_rope_changes_the_output_and_rope2d_uses_the_image_width(fixture_root):
    # Same weights (RoPE adds no parameter): a model that ignores the positions would give equal outputs.
    x = torch.randint(1, 16, (2, 12))
    outs = {}
    for pos in ("none", "rope"):
        torch.manual_seed(1)
        cfg = presets.build_config("listops", "transformer", "cpu-small", {**TINY, "model.pos": pos})
        outs[pos] = M.build_model(cfg).eval()(x)
    assert not torch.allclose(outs["none"], outs["rope"])
    cfg = presets.build_config("image", "transformer", "cpu-small", {**TINY, "model.pos": "rope2d"})
    layers = _attention_layers(M.build_model(cfg))
    assert all(layer.grid_width == task_info("image").resolution for layer in layers)
    loss, _ = _one_step(cfg, fixture_root["image"])
    assert math.isfinite(loss)


@pytest.mark.parametrize("model_name", config.MODELS)
def test_retrieval_model_uses_every_parameter(model_name, fixture_root):
    over = dict(TINY)
    cfg = presets.build_config("retrieval", model_name, "cpu-small", over)
    _, model = _one_step(cfg, fixture_root["retrieval"])
    assert isinstance(model.encoder.decoder, torch.nn.Identity)


def test_heads_follow_the_config():
    cfg = presets.preset_config("retrieval", "transformer", "paper")  # concat [u, v], mlp_dim then mlp_dim / 2, ReLU
    head = M.make_head(cfg, 2 * cfg.model.d_model, 2)
    shapes = [tuple(m.weight.shape) for m in head if isinstance(m, torch.nn.Linear)]
    assert shapes == [(512, 256), (256, 512), (2, 256)]
    assert any(isinstance(m, torch.nn.ReLU) for m in head)
    cfg = presets.preset_config("listops", "transformer", "paper")  # one hidden layer of mlp_dim
    head = M.make_head(cfg, cfg.model.d_model, 10)
    assert [tuple(m.weight.shape) for m in head if isinstance(m, torch.nn.Linear)] == [(2048, 512), (10, 2048)]
    cfg = presets.build_config("listops", "s4d", "cpu-small", {})
    assert isinstance(M.make_head(cfg, 64, 10), torch.nn.Linear)
    model = M.build_model(presets.build_config("text", "transformer", "cpu-small", {**TINY, "model.head": "mlp"}))
    assert isinstance(model.backbone.decoder, torch.nn.Sequential)
    x = torch.randint(1, 257, (3, 20))
    assert model(x).shape == (3, 2)


@pytest.mark.parametrize("task", ["listops", "image"])
def test_paper_ssm_options_reach_the_layer(task):
    cfg = presets.preset_config(task, "s4", "paper")
    layer_cfg = M.layer_config(cfg, 2000)
    assert (layer_cfg.n_ssm, layer_cfg.dt_transform, layer_cfg.tie_dropout, layer_cfg.mode) == (
        cfg.model.ssm.n_ssm, "softplus", cfg.model.ssm.tie_dropout, "dplr")
    cfg = presets.build_config(task, "s4", "paper", {"model.d_model": "16", "model.n_layers": "1"})
    model = M.build_model(cfg)
    layer = model.backbone.blocks[0].layer
    assert (layer.n_ssm, layer.config.dt_transform, layer.config.bidirectional) == (
        cfg.model.ssm.n_ssm, "softplus", True)
    x = torch.randint(1, 16, (2, 30)) if task == "listops" else torch.randint(0, 256, (2, 64))
    assert model(x).shape == (2, 10)


def _groups(model, cfg) -> dict:
    opt = M.make_optimizer(model, cfg)
    return {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_param_groups_follow_the_optimizer_settings():
    # S4 ListOps: A, B, P at 1e-3, dt at the global lr (its file says lr.dt: null), both without decay;
    # every other parameter decays, biases and norm scales included (`decay_vectors`).
    cfg = presets.build_config("listops", "s4", "paper", {"model.d_model": "16", "model.n_layers": "1"})
    model = M.build_model(cfg)
    where = _groups(model, cfg)
    named = dict(model.named_parameters())
    layer = "backbone.blocks.0.layer."
    for name in ("ssm.P", "ssm.log_neg_real", "ssm.imag", "ssm.B"):
        assert where[id(named[layer + name])] == (1e-3, 0.0), name
    assert where[id(named[layer + "ssm.log_dt"])] == (0.01, 0.0)
    assert where[id(named[layer + "out.bias"])] == (0.01, 0.05)
    assert len(where) == len(named)
    cfg = presets.build_config("listops", "s4", "cpu-small", {"model.d_model": "16", "model.n_layers": "1",
                                                               "optim.ssm_lr": "2e-3", "optim.dt_lr": "3e-3"})
    model = M.build_model(cfg)
    where = _groups(model, cfg)
    named = dict(model.named_parameters())
    assert where[id(named[layer + "out.bias"])] == (1e-2, 0.0)  # library default: vectors not decayed
    assert where[id(named[layer + "ssm.B"])] == (2e-3, 0.0)
    assert where[id(named[layer + "ssm.log_dt"])] == (3e-3, 0.0)
    opt = M.make_optimizer(model, cfg)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
