"""LRA config: the task table, `paper` presets equal to the public files (values transcribed here by
hand from the files, not from the code), the README table equal to the code, validation of every
field, and the learning-rate schedules against independent formulas."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from experiments.lra import config, presets, schedules
from experiments.lra.presets import preset_tables_markdown
from experiments.lra import tasks as T

REPO = Path(__file__).resolve().parents[2]

# --- tasks ------------------------------------------------------------------------------------


def test_task_table():
    assert T.TASKS == ("listops", "text", "retrieval", "image", "pathfinder", "pathx") == config.TASKS
    assert config.PIXEL_TASKS == T.PIXEL_TASKS == ("image", "pathfinder", "pathx")
    lengths = {t: T.task_info(t).seq_len for t in T.TASKS}
    assert lengths == {"listops": 2000, "text": 4096, "retrieval": 4000, "image": 1024, "pathfinder": 1024,
                       "pathx": 16384}
    assert [t for t in T.TASKS if T.task_info(t).two_tower] == ["retrieval"]
    for t in T.PIXEL_TASKS:
        info = T.task_info(t)
        assert info.seq_len == info.resolution ** 2 and info.vocab_size == 256 and info.pixel_channels == 1
    assert (T.task_info("listops").n_classes, T.task_info("image").n_classes, T.task_info("text").n_classes) == (10, 10, 2)
    assert T.task_info("pathfinder").resolution_len(64) == 4096
    with pytest.raises(ValueError, match="task must be one of"):
        T.task_info("mnist")
    with pytest.raises(ValueError, match="no pixel resolution"):
        T.task_info("text").resolution_len(32)


# --- paper presets = the public files -----------------------------------------------------------
# state-spaces/s4 configs/experiment/lra/s4-{listops,imdb,aan,cifar,pathfinder,pathx}.yaml (62a14bb; the
# Path-X lr 0.001 from the later commit 8bfbb6090bb3b8ba7ca51589a4403805c5dcd5c9, "Update PathX config
# learning rate"):
# d_model, prenorm, dropout, tie_dropout, d_state, layer lr (A/B, dt: "null" = global), dt_min, n_ssm,
# batch, lr, num_training_steps, num_warmup_steps, max_epochs, seed.
S4_FILES = {
    "listops": (256, False, 0.0, False, 4, (0.001, None), 0.001, 1, 32, 0.01, 120000, 12000, 40, 3333),
    "text": (256, True, 0.0, False, 4, (0.001, None), 0.001, 1, 16, 0.01, 50000, 5000, 32, 3333),
    "retrieval": (256, True, 0.0, False, 4, (0.001, None), 0.001, 1, 64, 0.01, 50000, 5000, 20, 3333),
    "image": (512, False, 0.1, True, 64, (0.001, 0.001), 0.001, 1, 50, 0.01, 180000, 18000, 200, 2222),
    "pathfinder": (256, True, 0.0, False, 64, (0.001, 0.001), 0.001, None, 64, 0.004, 500000, 50000, 200, 3333),
    "pathx": (256, True, 0.0, False, 64, (0.001, 0.001), 0.0001, None, 16, 0.001, 500000, 50000, 50, 3333),
}
# google-research/long-range-arena base_*_config.py (+ pathfinder32 transformer_base.py): emb_dim,
# num_layers, num_heads, mlp_dim, dropout_rate, pooling, learn_pos_emb, learning_rate, factors, warmup,
# steps_per_cycle, weight_decay, grad_clip_norm, batch_size, num_train_steps (rsqrt tasks), max_length.
LRA_FILES = {
    "listops": (512, 6, 8, 2048, 0.1, "cls", False, 0.05, "rsqrt", 1000, None, 0.1, None, 32, 5000, 2000),
    "text": (256, 4, 4, 1024, 0.1, "cls", False, 0.05, "rsqrt", 8000, None, 0.1, None, 32, 20000, 1000),
    "retrieval": (128, 4, 4, 512, 0.1, "cls", False, 0.05, "rsqrt", 8000, None, 0.1, None, 32, 5000, 4000),
    "image": (32, 1, 1, 64, 0.3, "cls", True, 5e-4, "cosine_lra", 45000 // 256, 45000 // 256 * 200, 0.0, None,
              256, None, 1024),
    "pathfinder": (128, 1, 4, 128, 0.2, "mean", False, 1e-3, "cosine_lra", 160000 // 512, 160000 // 512 * 200,
                   0.0, None, 512, None, 1024),
    "pathx": (32, 1, 2, 32, 0.1, "mean", True, 1e-3, "cosine_lra", 160000 // 64, 160000 // 64 * 200, 0.0, 1.0,
              64, None, 16384),
}


@pytest.mark.parametrize("model", ["s4", "s4d"])
@pytest.mark.parametrize("task", config.TASKS)
def test_s4_paper_preset_equals_public_config(task, model):
    (d_model, prenorm, dropout, tie, d_state, (ab_lr, dt_lr), dt_min, n_ssm, batch, lr, steps, warmup, epochs,
     seed) = S4_FILES[task]
    cfg = presets.preset_config(task, model, "paper")
    m, s, o = cfg.model, cfg.model.ssm, cfg.optim
    assert (m.d_model, m.n_layers, m.block.prenorm, m.block.norm, s.dropout, s.tie_dropout) == (
        d_model, 6, prenorm, "batch", dropout, tie)
    assert (s.d_state, s.n_ssm, s.dt_min, s.dt_max, s.init, m.bidirectional) == (d_state, n_ssm, dt_min, 0.1,
                                                                                 "legs", True)
    assert s.dt_transform == "softplus"  # configs/model/layer/s4.yaml
    assert s.mode == ("dplr" if model == "s4" else "diag") and s.bidirectional
    assert (m.pooling, m.pos) == ("mean", "none")
    assert (o.ssm_lr, o.dt_lr, o.lr, o.weight_decay) == (ab_lr, dt_lr, lr, 0.05)
    assert (o.schedule, o.schedule_steps, o.warmup_steps, o.min_lr_frac) == ("cosine", steps, warmup, 0.0)
    assert o.grad_clip == 0.0 and o.decay_vectors  # trainer gradient_clip_val: null; only SSM params exempt
    assert (o.beta1, o.beta2, o.eps) == (0.9, 0.999, 1e-8)  # torch AdamW defaults
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.train.seed, cfg.train.max_steps) == (batch, epochs, seed,
                                                                                           None)
    assert config.sequence_length(cfg) == T.task_info(task).seq_len
    if task == "retrieval":  # RetrievalDecoder: nli features, MLP with hidden d_model
        assert (m.head, m.interaction, m.head_hidden) == ("mlp", "nli", 256)
    else:
        assert m.head == "linear"
    if task in config.PIXEL_TASKS:
        assert cfg.data.pixel_input == "real"


@pytest.mark.parametrize("task", config.TASKS)
def test_transformer_paper_preset_equals_lra_config(task):
    (d_model, n_layers, n_heads, d_mlp, dropout, pool, learned, lr, schedule, warmup, cycle, wd, clip, batch,
     train_steps, max_length) = LRA_FILES[task]
    cfg = presets.preset_config(task, "transformer", "paper")
    m, a, o = cfg.model, cfg.model.attention, cfg.optim
    assert (m.d_model, m.n_layers, a.n_heads, a.d_mlp, a.dropout) == (d_model, n_layers, n_heads, d_mlp, dropout)
    assert (m.pooling, m.pos, m.block.prenorm, m.block.norm) == (pool, "learned" if learned else "sinusoidal", True,
                                                                 "layer")
    assert m.bidirectional and a.bidirectional  # the LRA Transformer is not causal
    assert (m.head, m.head_hidden, m.head_act) == ("mlp2" if task == "retrieval" else "mlp", d_mlp, "relu")
    assert (o.lr, o.schedule, o.warmup_steps, o.schedule_steps, o.weight_decay) == (lr, schedule, warmup, cycle, wd)
    assert o.grad_clip == (clip or 0.0) and (o.beta1, o.beta2, o.eps) == (0.9, 0.98, 1e-9) and o.decay_vectors
    assert cfg.data.batch_size == batch and cfg.train.seed == 0 and cfg.data.pixel_input == "tokens"
    assert config.sequence_length(cfg) == max_length
    assert cfg.train.max_steps == train_steps
    if train_steps is None:
        assert cfg.train.epochs == 200
    else:  # the smallest whole number of epochs that holds the step count
        n_train = {"listops": 96000, "text": 25000, "retrieval": 147086}[task]
        assert cfg.train.epochs == math.ceil(train_steps * batch / n_train)
    if task == "retrieval":
        assert m.interaction == "concat"


def test_cpu_small_listops_fits_generated_data():
    # `generate listops` writes up to 2,000 tokens; the preset must not cut them.
    cfg = presets.preset_config("listops", "s4d", "cpu-small")
    assert cfg.data.max_len is None and config.sequence_length(cfg) == 2000


def test_readme_table_matches_code():
    text = (REPO / "docs" / "lra_tables.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- presets:begin -->\n(.*?)\n<!-- presets:end -->", text, re.S)
    assert found, "docs/lra_tables.md lacks the <!-- presets:begin --> ... <!-- presets:end --> section"
    assert found.group(1).strip() == preset_tables_markdown().strip(), \
        "README preset table is stale: paste the output of `python -m experiments.lra.presets --table`"


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, match", [
    ("optim.lr", "-1", r"--optim\.lr must be a finite number > 0, got -1\.0"),
    ("optim.lr", "nan", r"--optim\.lr must be a finite number > 0, got nan"),
    ("optim.lr", "inf", r"--optim\.lr must be a finite number > 0"),
    ("optim.ssm_lr", "0", r"--optim\.ssm_lr must be a finite number > 0 or None"),
    ("model.ssm.d_state", "63", r"--model\.ssm\.d_state must be an even integer >= 2"),
    ("model.ssm.d_state", "0", r"--model\.ssm\.d_state must be an even integer >= 2"),
    ("model.ssm.dropout", "1.5", r"--model\.ssm\.dropout must be a finite number in \[0, 1\), got 1\.5"),
    ("data.batch_size", "0", r"--data\.batch_size must be an integer >= 1, got 0"),
    ("train.epochs", "0", r"--train\.epochs must be an integer >= 1, got 0"),
    ("model.ssm.n_ssm", "3", r"--model\.ssm\.n_ssm=3 must divide --model\.d_model=64"),
    ("model.ssm.n_ssm", "0", r"--model\.ssm\.n_ssm must be an integer >= 1 or None"),
    ("model.rope_scaling", "warp", r"--model\.rope_scaling must be one of \('none', 'linear'"),
    ("model.ssm.dt_min", "0", r"--model\.ssm\.dt_min must be a finite number > 0"),
    ("model.ssm.dt_max", "1e-5", r"--model\.ssm\.dt_min=0\.001 must not exceed --model\.ssm\.dt_max=1e-05"),
    ("model.ssm.init", "legt", r"--model\.ssm\.init must be one of \('lin', 'inv', 'legs', 'real'\)"),
    ("model.pos", "rope", r"--model\.pos=rope needs --model transformer"),
    ("optim.warmup_frac", "1", r"--optim\.warmup_frac must be a finite number in \[0, 1\)"),
    ("optim.beta2", "1", r"--optim\.beta2 must be a finite number in \[0, 1\)"),
    ("optim.grad_clip", "-1", r"--optim\.grad_clip must be a finite number >= 0"),
    ("optim.weight_decay", "nan", r"--optim\.weight_decay must be a finite number >= 0"),
    ("optim.schedule", "rsqrt", r"--optim\.warmup_steps must be an integer >= 1 with --optim\.schedule=rsqrt"),
    ("data.pathfinder_resolution", "64", r"--data\.pathfinder_resolution must be None, or 32, 64, 128 or 256"),
    ("data.max_len", "0", r"--data\.max_len must be an integer >= 1 or None"),
    ("train.log_every", "0", r"--train\.log_every must be an integer >= 1"),
    ("train.seed", "-1", r"--train\.seed must be an integer >= 0"),
    ("train.checkpoint_every", "0", r"--train\.checkpoint_every must be an integer >= 1 or None"),
])
def test_bad_values_are_refused_naming_the_field(key, value, match):
    with pytest.raises(ValueError, match=match):
        presets.build_config("listops", "s4d", "cpu-small", {key: value})


@pytest.mark.parametrize("overrides, match", [
    ({"model.attention.n_heads": "3"}, r"--model\.attention\.n_heads=3 must divide --model\.d_model=64"),
    ({"model.rope_scaling": "yarn"}, r"--model\.rope_scaling=yarn needs --model\.pos=rope or rope2d"),
    ({"model.pos": "rope", "model.rope_scaling": "yarn"}, r"--model\.rope_scaling=yarn: .*needs 'factor'"),
    ({"model.pos": "rope", "model.rope_scaling": "rerope"}, r"--model\.rope_scaling=rerope: .*needs 'window'"),
    ({"model.pos": "rope", "model.rope_factor": "2"}, r"need --model\.rope_scaling"),
    ({"model.pos": "rope", "model.rope_scaling": "linear", "model.rope_factor": "-2"},
     r"--model\.rope_factor must be a finite number > 0"),
    ({"model.pos": "rope", "model.rope_scaling": "yarn", "model.rope_factor": "2", "model.rope_params": "{oops"},
     r"--model\.rope_params must be a JSON object"),
    ({"model.pos": "rope2d"}, r"--model\.pos=rope2d needs a pixel task"),
])
def test_bad_transformer_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        presets.build_config("listops", "transformer", "cpu-small", overrides)


def test_several_errors_reported_together_and_direct_edits_checked():
    cfg = presets.preset_config("image", "s4", "paper")
    cfg.train.epochs, cfg.model.ssm.dropout, cfg.model.bidirectional = 0, -0.1, 1
    with pytest.raises(ValueError) as err:
        config.validate(cfg)
    msg = str(err.value)
    assert msg.startswith("invalid config: ")
    for key in ("--train.epochs", "--model.ssm.dropout", "--model.bidirectional must be true or false"):
        assert key in msg


def test_every_preset_validates_and_good_overrides_pass():
    for task in config.TASKS:
        for model in config.MODELS:
            for preset in config.PRESETS:
                config.validate(presets.preset_config(task, model, preset))
    cfg = presets.build_config("text", "transformer", "paper", {
        "model.pos": "rope", "model.rope_scaling": "yarn", "model.rope_factor": "4",
        "model.rope_params": '{"beta_fast": 16}'})
    assert config.rope_scaling_dict(cfg) == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1001,
                                        "beta_fast": 16}
    assert presets.build_config("image", "transformer", "paper", {"model.pos": "rope2d"}).model.pos == "rope2d"


# --- schedules ------------------------------------------------------------------------------------

def test_cosine_schedule_equals_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = presets.preset_config("listops", "s4", "paper").optim
    cfg.warmup_steps, cfg.schedule_steps = 7, 40
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=40)
    for t in range(40):
        assert schedules.lr_multiplier(cfg, t, total_steps=999) == pytest.approx(ref.get_last_lr()[0], abs=1e-12), t
        opt.step()
        ref.step()


def test_rsqrt_and_lra_cosine_schedules():
    o = presets.preset_config("listops", "transformer", "paper").optim  # lr 0.05, warmup 1000
    peak = 0.05 / math.sqrt(1000)  # LRA ListOps: constant * linear_warmup * rsqrt_decay
    assert o.lr * schedules.lr_multiplier(o, 0, 5000) == 0.0
    assert o.lr * schedules.lr_multiplier(o, 500, 5000) == pytest.approx(peak / 2)
    assert o.lr * schedules.lr_multiplier(o, 1000, 5000) == pytest.approx(peak)
    assert o.lr * schedules.lr_multiplier(o, 4000, 5000) == pytest.approx(peak / 2)
    i = presets.preset_config("image", "transformer", "paper").optim  # warmup 175, cycle 35000
    assert schedules.lr_multiplier(i, 175, 0) == pytest.approx(1.0)
    assert schedules.lr_multiplier(i, 175 + 17500, 0) == pytest.approx(0.5)
    assert schedules.lr_multiplier(i, 175 + 35000, 0) == pytest.approx(1.0)  # cyclic, as in the LRA code
    c = presets.preset_config("listops", "s4d", "cpu-small").optim  # warmup_frac 0.05 of the trainer's total
    assert schedules.warmup_and_total(c, 200) == (10, 200)
    assert schedules.lr_multiplier(c, 5, 200) == pytest.approx(0.5) and schedules.lr_multiplier(c, 200, 200) == pytest.approx(0.0)


def test_table_cli_prints_the_readme_section(capsys):
    presets.main(["--table"])
    assert capsys.readouterr().out.strip() == preset_tables_markdown().strip()


def test_overrides_parse_int_or_str_and_tuple_fields():
    from experiments.lra import presets

    cfg = presets.build_config("listops", "mamba", "cpu-small", {"model.mamba.dt_rank": "8"})
    assert cfg.model.mamba.dt_rank == 8
    cfg = presets.build_config("listops", "mamba", "cpu-small", {"model.mamba.dt_rank": "auto"})
    assert cfg.model.mamba.dt_rank == "auto"
    cfg = presets.build_config("listops", "mamba2", "cpu-small", {"model.mamba2.A_init_range": "2,8",
                                                                  "model.mamba2.dt_limit": "(0.001, inf)"})
    assert cfg.model.mamba2.A_init_range == (2.0, 8.0) and cfg.model.mamba2.dt_limit == (0.001, float("inf"))
    with pytest.raises(ValueError, match="A_init_range: expected float, got 'x'"):
        presets.build_config("listops", "mamba2", "cpu-small", {"model.mamba2.A_init_range": "1,x"})
