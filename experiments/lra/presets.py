"""The LRA presets: the values of `--preset paper` and `--preset cpu-small`, and where each comes from.

`preset_config(task, model, preset)` fills the dataclasses of `experiments.lra.config` for one task
and model; `build_config(task, model, preset, overrides)` then applies command-line overrides and
validates: the config a run uses.

- `paper`: `s4` equals the public S4 LRA configurations of the state-spaces/s4 repository
  (`configs/experiment/lra/s4-*.yaml` and what they inherit), `s4d` is the same with the diagonal
  layer (no public S4D LRA config exists: see `DIFFERENCES`), `transformer` equals the LRA paper's
  Transformer configurations (google-research/long-range-arena, `lra_benchmarks/*/configs/`).
- `cpu-small`: narrow, shallow models for CPU runs. ListOps keeps its full length (the generator
  writes at most 2,000 tokens, the task length); Text and Retrieval are capped at 1,024 bytes on
  purpose (longer documents are truncated, and the data loader reports how many); the image tasks
  keep their full length. Its ListOps row is the quick start.
- `mamba` / `mamba2` (either preset): no public LRA configuration exists; each preset's S4 values
  (sizes, optimizer, schedule, data) with the selective layer in place of S4, made causal
  (`bidirectional=False`: the selective scan has no backward direction), pre-norm with layer norm,
  and the public modules' state sizes (Mamba d_state 16; Mamba-2 d_state 64, head size 64; in
  cpu-small Mamba-2 head size 16 and chunk size 64). cpu-small uses lr 4e-3 for them.

`python -m experiments.lra.presets --table` prints the README's table of every `paper` value with the
public file it comes from (`SOURCES`, `SOURCE_FILES`, `DIFFERENCES`); a test compares the two, so the
table and the presets cannot drift apart. Tasks: `docs/lra.md`.
"""
from __future__ import annotations

import dataclasses

from experiments.lra.config import (MODELS, PIXEL_TASKS, PRESETS, SELECTIVE, TASKS, Config, check_names, derive,
                                    get_field, sequence_length, validate)
from experiments.lra.overrides import apply_overrides

S4_COMMIT = "62a14bb"  # state-spaces/s4 commit of the configs/experiment/lra/s4-*.yaml files read
# The later commit "Update PathX config learning rate" of s4-pathx.yaml (0.002 -> 0.001): the public
# Path-X lr since then (the file's only other change, dropping `final_act: glu`, is the default).
S4_PATHX_LR_COMMIT = "8bfbb6090bb3b8ba7ca51589a4403805c5dcd5c9"

# S4 (state-spaces/s4 configs/experiment/lra/s4-<file>.yaml at S4_COMMIT; Path-X lr at
# S4_PATHX_LR_COMMIT): per task, the values that differ between tasks; the rest is in `_ssm_paper`.
_S4_PAPER = {
    "listops": dict(d_model=256, d_state=4, n_ssm=1, prenorm=False, dropout=0.0, tie_dropout=False, lr=0.01,
                    dt_lr=None, batch=32, epochs=40, steps=120_000, warmup=12_000, seed=3333, dt_min=1e-3),
    "text": dict(d_model=256, d_state=4, n_ssm=1, prenorm=True, dropout=0.0, tie_dropout=False, lr=0.01,
                 dt_lr=None, batch=16, epochs=32, steps=50_000, warmup=5_000, seed=3333, dt_min=1e-3),
    "retrieval": dict(d_model=256, d_state=4, n_ssm=1, prenorm=True, dropout=0.0, tie_dropout=False, lr=0.01,
                      dt_lr=None, batch=64, epochs=20, steps=50_000, warmup=5_000, seed=3333, dt_min=1e-3),
    "image": dict(d_model=512, d_state=64, n_ssm=1, prenorm=False, dropout=0.1, tie_dropout=True, lr=0.01,
                  dt_lr=1e-3, batch=50, epochs=200, steps=180_000, warmup=18_000, seed=2222, dt_min=1e-3),
    "pathfinder": dict(d_model=256, d_state=64, n_ssm=None, prenorm=True, dropout=0.0, tie_dropout=False,
                       lr=0.004, dt_lr=1e-3, batch=64, epochs=200, steps=500_000, warmup=50_000, seed=3333,
                       dt_min=1e-3),
    "pathx": dict(d_model=256, d_state=64, n_ssm=None, prenorm=True, dropout=0.0, tie_dropout=False, lr=0.001,
                  dt_lr=1e-3, batch=16, epochs=50, steps=500_000, warmup=50_000, seed=3333, dt_min=1e-4),
}
# LRA Transformer (google-research/long-range-arena lra_benchmarks/<task>/configs/base_*_config.py and
# transformer_base.py): layers, heads, d_model, d_mlp, dropout, pooling, positions, lr, schedule,
# warmup steps, cosine cycle steps, weight decay, grad clip, batch, epochs, max steps, max_len.
_TRANSFORMER_PAPER = {
    "listops": dict(n_layers=6, n_heads=8, d_model=512, d_mlp=2048, dropout=0.1, pooling="cls", pos="sinusoidal",
                    lr=0.05, schedule="rsqrt", warmup=1000, steps=None, wd=0.1, clip=0.0, batch=32, epochs=2,
                    max_steps=5000, max_len=None),
    "text": dict(n_layers=4, n_heads=4, d_model=256, d_mlp=1024, dropout=0.1, pooling="cls", pos="sinusoidal",
                 lr=0.05, schedule="rsqrt", warmup=8000, steps=None, wd=0.1, clip=0.0, batch=32, epochs=26,
                 max_steps=20_000, max_len=1000),
    "retrieval": dict(n_layers=4, n_heads=4, d_model=128, d_mlp=512, dropout=0.1, pooling="cls", pos="sinusoidal",
                      lr=0.05, schedule="rsqrt", warmup=8000, steps=None, wd=0.1, clip=0.0, batch=32, epochs=2,
                      max_steps=5000, max_len=None),
    "image": dict(n_layers=1, n_heads=1, d_model=32, d_mlp=64, dropout=0.3, pooling="cls", pos="learned",
                  lr=5e-4, schedule="cosine_lra", warmup=175, steps=35_000, wd=0.0, clip=0.0, batch=256,
                  epochs=200, max_steps=None, max_len=None),
    "pathfinder": dict(n_layers=1, n_heads=4, d_model=128, d_mlp=128, dropout=0.2, pooling="mean",
                       pos="sinusoidal", lr=1e-3, schedule="cosine_lra", warmup=312, steps=62_400, wd=0.0,
                       clip=0.0, batch=512, epochs=200, max_steps=None, max_len=None),
    "pathx": dict(n_layers=1, n_heads=2, d_model=32, d_mlp=32, dropout=0.1, pooling="mean", pos="learned",
                  lr=1e-3, schedule="cosine_lra", warmup=2500, steps=500_000, wd=0.0, clip=1.0, batch=64,
                  epochs=200, max_steps=None, max_len=None),
}
# cpu-small: sequence cap, d_model, layers, batch, epochs, lr. The ListOps row is what
# `experiments.lra.quickstart` trains (16k generated sequences of 20-100 tokens): 2000 S4D steps
# took 4.2 min on 2 cores (54.9% test accuracy, majority class 15.6%).
_CPU_SMALL = {
    "listops": (None, 64, 4, 32, 4, 1e-2),
    "text": (1024, 64, 2, 16, 2, 4e-3),
    "retrieval": (1024, 64, 2, 16, 2, 4e-3),
    "image": (1024, 64, 2, 32, 2, 4e-3),
    "pathfinder": (1024, 64, 2, 32, 2, 4e-3),
    "pathx": (16384, 32, 2, 4, 1, 2e-3),
}


def _ssm_paper(cfg: Config) -> None:
    p, m = _S4_PAPER[cfg.task], cfg.model
    m.d_model, m.n_layers, m.bidirectional, m.pooling, m.pos = p["d_model"], 6, True, "mean", "none"
    m.head, m.head_act, m.interaction, m.head_hidden = "linear", "gelu", "nli", None
    if cfg.task == "retrieval":
        m.head, m.head_hidden = "mlp", p["d_model"]
    m.ssm = dataclasses.replace(m.ssm, d_state=p["d_state"], n_ssm=p["n_ssm"], init="legs", dt_min=p["dt_min"],
                                dt_max=0.1, dt_transform="softplus", dropout=p["dropout"],
                                tie_dropout=p["tie_dropout"])
    m.block = dataclasses.replace(m.block, prenorm=p["prenorm"], norm="batch")
    cfg.optim = dataclasses.replace(
        cfg.optim, lr=p["lr"], ssm_lr=1e-3, dt_lr=p["dt_lr"], weight_decay=0.05, beta1=0.9, beta2=0.999,
        eps=1e-8, schedule="cosine", warmup_steps=p["warmup"], schedule_steps=p["steps"],
        warmup_frac=p["warmup"] / p["steps"], min_lr_frac=0.0, grad_clip=0.0, decay_vectors=True)
    cfg.data = dataclasses.replace(cfg.data, batch_size=p["batch"], max_len=None, pixel_input="real")
    cfg.train = dataclasses.replace(cfg.train, epochs=p["epochs"], seed=p["seed"], max_steps=None)


def _transformer_paper(cfg: Config) -> None:
    p, m = _TRANSFORMER_PAPER[cfg.task], cfg.model
    m.n_layers, m.d_model, m.pooling, m.pos = p["n_layers"], p["d_model"], p["pooling"], p["pos"]
    m.head, m.head_act, m.head_hidden = ("mlp2" if cfg.task == "retrieval" else "mlp"), "relu", p["d_mlp"]
    m.interaction = "concat"
    m.attention = dataclasses.replace(m.attention, n_heads=p["n_heads"], d_mlp=p["d_mlp"], dropout=p["dropout"])
    m.block = dataclasses.replace(m.block, prenorm=True, norm="layer")
    cfg.optim = dataclasses.replace(
        cfg.optim, lr=p["lr"], weight_decay=p["wd"], beta1=0.9, beta2=0.98, eps=1e-9, schedule=p["schedule"],
        warmup_steps=p["warmup"], schedule_steps=p["steps"], warmup_frac=0.0, min_lr_frac=0.0,
        grad_clip=p["clip"], decay_vectors=True)
    cfg.data = dataclasses.replace(cfg.data, batch_size=p["batch"], max_len=p["max_len"], pixel_input="tokens")
    cfg.train = dataclasses.replace(cfg.train, epochs=p["epochs"], max_steps=p["max_steps"], seed=0)


def _cpu_small(cfg: Config) -> None:
    max_len, d_model, n_layers, batch, epochs, lr = _CPU_SMALL[cfg.task]
    cfg.data = dataclasses.replace(cfg.data, max_len=max_len, batch_size=batch)
    # One thread: on a shared 2-core machine two OpenMP threads per process ran 10x slower than one
    # (60 S4D ListOps steps: 144 s vs 14 s at load ~5).
    cfg.train = dataclasses.replace(cfg.train, epochs=epochs, log_every=10, threads=1)
    cfg.optim = dataclasses.replace(cfg.optim, lr=lr, weight_decay=0.05, warmup_frac=0.05)
    m = cfg.model
    m.d_model, m.n_layers, m.pooling = d_model, n_layers, "mean"
    m.head = "mlp" if cfg.task == "retrieval" else "linear"
    if cfg.model_name == "transformer":
        m.pos = "sinusoidal"
        m.attention = dataclasses.replace(m.attention, n_heads=4, d_mlp=2 * d_model)
        cfg.optim.lr = 1e-3
    elif cfg.model_name in SELECTIVE:
        _selective(cfg)
        cfg.optim.lr = 4e-3
    else:
        # Post-norm + batch norm reached 39.5% ListOps val accuracy after 500 steps where pre-norm +
        # layer norm reached 35.5% (same data, seed and lr).
        m.bidirectional, m.pos = True, "none"
        # b_clip=None: the exact eigenbasis B, with which the quick start's published numbers were made.
        m.ssm = dataclasses.replace(m.ssm, d_state=64, b_clip=None)
        m.block = dataclasses.replace(m.block, prenorm=False, norm="batch")


def _selective(cfg: Config) -> None:
    """Mamba / Mamba-2: causal (the only way they run), pre-norm with layer norm (the Mamba blocks'
    own arrangement), the public modules' state sizes except Mamba-2's in cpu-small: head size 16
    (a 64-wide model, d_inner 128, gets 8 heads, and narrower test models still divide) and chunk
    size 64."""
    m = cfg.model
    m.bidirectional, m.pos = False, "none"
    m.block = dataclasses.replace(m.block, prenorm=True, norm="layer", d_ff=None)
    if cfg.model_name == "mamba2":
        # chunk_size only trades work between the scan's two stages (the result does not depend on
        # it); 64 instead of 256 keeps the chunked scan from padding ListOps' short sequences.
        small = cfg.preset == "cpu-small"
        m.mamba2 = dataclasses.replace(m.mamba2, d_state=64, headdim=16 if small else 64,
                                       chunk_size=64 if small else 256)


def preset_config(task: str, model: str, preset: str = "cpu-small") -> Config:
    """The configuration of `preset` for `task` and `model` ("s4" | "s4d" | "transformer"), validated."""
    check_names(task, model, preset)
    cfg = Config(task=task, model_name=model, preset=preset)
    # S4 fed pixels as real values; the LRA Transformer embeds the 256 intensities as tokens.
    cfg.data.pixel_input = "tokens" if model == "transformer" else "real"
    if task == "pathx":
        cfg.model.ssm.dt_min = 1e-4
    if preset == "paper":
        (_transformer_paper if model == "transformer" else _ssm_paper)(cfg)
        if model in SELECTIVE:
            _selective(cfg)
    else:
        _cpu_small(cfg)
    validate(derive(cfg))
    return cfg


_S4_FILE = {"listops": "listops", "text": "imdb", "retrieval": "aan", "image": "cifar", "pathfinder": "pathfinder",
            "pathx": "pathx"}
# Where each value of the `paper` preset comes from. Codes are explained by `SOURCE_FILES`.
SOURCES = {
    "ssm": {
        "data.batch_size": "E loader.batch_size", "data.max_len": "tasks.py (LRA lengths); D l_max",
        "data.pixel_input": "P encoder: linear on x/255", "model.d_model": "E model.d_model",
        "model.n_layers": "E model.n_layers", "model.ssm.d_state": "E layer.d_state", "model.ssm.n_ssm": "E layer.n_ssm",
        "model.ssm.init": "E layer.init", "model.bidirectional": "E layer.bidirectional",
        "model.ssm.dt_min": "E layer.dt_min", "model.ssm.dt_max": "E layer.dt_max", "model.ssm.dt_transform": "L dt_transform",
        "model.ssm.dropout": "E model.dropout", "model.ssm.tie_dropout": "E model.tie_dropout (absent: false)",
        "model.block.prenorm": "E model.prenorm", "model.block.norm": "E model.norm", "model.pooling": "E/P decoder.mode: pool",
        "model.pos": "none in S4", "model.head": "P decoder (retrieval: RetrievalDecoder)",
        "model.head_hidden": "P/RetrievalHead d_model", "model.head_act": "P decoder activation",
        "model.interaction": "RetrievalHead nli=True", "optim.lr": "E optimizer.lr (pathx: E at 8bfbb60)",
        "optim.ssm_lr": "E layer.lr (A, B)", "optim.dt_lr": "E layer.lr.dt (null: global lr)",
        "optim.weight_decay": "E optimizer.weight_decay", "optim.decay_vectors": "TR: only SSM params exempt",
        "optim.beta1": "O (torch AdamW default)", "optim.beta2": "O (torch AdamW default)",
        "optim.eps": "O (torch AdamW default)", "optim.schedule": "E scheduler: cosine_warmup",
        "optim.warmup_steps": "E scheduler.num_warmup_steps", "optim.schedule_steps": "E scheduler.num_training_steps",
        "optim.min_lr_frac": "S (decays to 0)", "optim.grad_clip": "T gradient_clip_val: null",
        "train.epochs": "E trainer.max_epochs", "train.max_steps": "-", "train.seed": "E train.seed",
        "train.amp": "library choice (see differences)",
    },
    "transformer": {
        "data.batch_size": "C batch_size", "data.max_len": "C max_length (image tasks: image size)",
        "data.pixel_input": "C/input pipeline: 256-way embedding", "model.d_model": "C emb_dim",
        "model.n_layers": "C num_layers", "model.attention.n_heads": "C num_heads", "model.attention.d_mlp": "C mlp_dim",
        "model.attention.dropout": "C dropout_rate (TM default 0.1)", "model.block.prenorm": "TM (LayerNorm before each sublayer)",
        "model.block.norm": "TM", "model.pooling": "C classifier_pool / pooling_mode", "model.pos": "C learn_pos_emb",
        "model.head": "CL classifier_head(_dual)", "model.head_hidden": "CL (mlp_dim)", "model.head_act": "CL relu",
        "model.interaction": "TT: interaction not set (concat)", "optim.lr": "C learning_rate",
        "optim.weight_decay": "C weight_decay", "optim.decay_vectors": "TU flax Adam decays all",
        "optim.beta1": "TU/TT Adam beta1", "optim.beta2": "TU/TT Adam beta2", "optim.eps": "TU/TT Adam eps",
        "optim.schedule": "C factors", "optim.warmup_steps": "C warmup (ListOps: TU default)",
        "optim.schedule_steps": "C steps_per_cycle", "optim.grad_clip": "C grad_clip_norm",
        "train.epochs": "C num_train_steps / NUM_EPOCHS", "train.max_steps": "C num_train_steps",
        "train.seed": "C random_seed", "train.amp": "library choice (see differences)",
    },
}
SOURCE_FILES = {
    "ssm": [
        ("E", f"state-spaces/s4 `configs/experiment/lra/s4-{{listops,imdb,aan,cifar,pathfinder,pathx}}.yaml` "
              f"(commit {S4_COMMIT})"),
        ("L", "`configs/model/layer/s4.yaml`"), ("P", "`configs/pipeline/{listops,imdb,aan,cifar,pathfinder}.yaml`"),
        ("O", "`configs/optimizer/adamw.yaml`"), ("S", "`configs/scheduler/cosine_warmup.yaml`"),
        ("T", "`configs/trainer/default.yaml`"), ("TR", "`train.py` (`configure_optimizers`)"),
        ("D", "`src/dataloaders/lra.py`")],
    "transformer": [
        ("C", "google-research/long-range-arena `lra_benchmarks/{listops,text_classification,matching}/configs/"
              "base_*_config.py`, `lra_benchmarks/image/configs/{cifar10,pathfinder32,pathfinder128}/"
              "base_*_config.py` and `transformer_base.py`"),
        ("TM", "`lra_benchmarks/models/transformer/transformer.py`"),
        ("CL", "`lra_benchmarks/models/layers/common_layers.py`"),
        ("TU", "`lra_benchmarks/utils/train_utils.py`"), ("TT", "`lra_benchmarks/<task>/train.py`")],
}
# Where the presets knowingly differ from the public setups, and why.
DIFFERENCES = {
    "ssm": [
        "`s4d`: no S4D LRA configuration is public (state-spaces/s4 has only `s4-*.yaml` under "
        "`configs/experiment/lra/`; the S4D paper's appendix table could not be read here), so `s4d` uses "
        "the S4 values with the diagonal layer (`init=legs`, S4D-LegS, ZOH).",
        f"Path-X lr: 0.001, from the later state-spaces/s4 commit {S4_PATHX_LR_COMMIT} (\"Update PathX config "
        f"learning rate\", 0.002 -> 0.001 in `s4-pathx.yaml`); every other value is read at {S4_COMMIT}.",
        "Tokens: S4 builds a vocabulary from the training data (characters for Text/Retrieval, min_freq 15 "
        "for Text) and appends an end-of-sequence token; here tokens are UTF-8 bytes + 1 (as in the LRA "
        "release) with no EOS, so Text/Retrieval sequences are at most 4,096/4,000 tokens instead of 4,095 + EOS.",
        "Final norm of pre-norm models: S4 uses the block's norm kind (batch norm); `ssm.models.SequenceModel` "
        "uses LayerNorm.",
        "Precision: S4 trains in float32 (Lightning default); here bf16 autocast on CUDA (`train.amp`, the SSM "
        "kernel itself stays float32): `--train.amp=false` for float32.",
        "Retrieval head activation: GELU as in S4's AAN pipeline (`RetrievalDecoder` defaults to ReLU; the "
        "pipeline file was not in the stored index, so GELU is unverified).",
    ],
    "transformer": [
        "Attention dropout: the LRA code has a separate `attention_dropout_rate` (0.1; Image 0.2); "
        "`TransformerBlock` has one dropout rate for both.",
        "Query/key/value width: LRA's `qkv_dim` is 64 (Pathfinder) and 16 (Path-X) with `emb_dim` 128 / 32; "
        "here attention works at d_model.",
        "CLS token: LRA prepends it at position 0; `SequenceModel` writes it after the last real token. "
        "LRA's MEAN pooling also averages padding; here only real positions (image tasks have none).",
        "Text length: `base_tc_config.py` sets max_length 1000 although the LRA paper describes Text at 4K; "
        "the preset follows the file (`--data.max_len=4096` for 4K).",
        "Steps: the LRA runs are step-bounded (`num_train_steps`); `train.max_steps` holds that number and "
        "`train.epochs` is the smallest whole number of epochs containing it.",
        "Precision: bf16 autocast on CUDA here (`train.amp`); LRA trained in float32 on TPU.",
    ],
}
_TABLE_FIELDS = {
    "ssm": ["data.batch_size", "data.max_len", "data.pixel_input", "model.d_model", "model.n_layers", "model.ssm.d_state",
            "model.ssm.n_ssm", "model.ssm.init", "model.bidirectional", "model.ssm.dt_min", "model.ssm.dt_max", "model.ssm.dt_transform",
            "model.ssm.dropout", "model.ssm.tie_dropout", "model.block.prenorm", "model.block.norm", "model.pooling", "model.pos",
            "model.head", "model.head_hidden", "model.head_act", "model.interaction", "optim.lr", "optim.ssm_lr",
            "optim.dt_lr", "optim.weight_decay", "optim.decay_vectors", "optim.beta1", "optim.beta2", "optim.eps",
            "optim.schedule", "optim.warmup_steps", "optim.schedule_steps", "optim.min_lr_frac", "optim.grad_clip",
            "train.epochs", "train.max_steps", "train.seed", "train.amp"],
    "transformer": ["data.batch_size", "data.max_len", "data.pixel_input", "model.d_model", "model.n_layers",
                    "model.attention.n_heads", "model.attention.d_mlp", "model.attention.dropout", "model.block.prenorm", "model.block.norm", "model.pooling",
                    "model.pos", "model.head", "model.head_hidden", "model.head_act", "model.interaction",
                    "optim.lr", "optim.weight_decay", "optim.decay_vectors", "optim.beta1", "optim.beta2",
                    "optim.eps", "optim.schedule", "optim.warmup_steps", "optim.schedule_steps", "optim.grad_clip",
                    "train.epochs", "train.max_steps", "train.seed", "train.amp"],
}


def _cell(cfg: Config, key: str) -> str:
    value = get_field(cfg, key)
    if key == "data.pixel_input" and cfg.task not in PIXEL_TASKS:
        return "-"
    if key in ("model.interaction", "model.head_hidden") and cfg.task != "retrieval" and cfg.model.head == "linear":
        return "-"
    if key == "model.interaction" and cfg.task != "retrieval":
        return "-"
    if key == "data.max_len" and value is None:
        return f"{sequence_length(cfg)}"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def preset_table(kind: str) -> str:
    """Markdown table of the `paper` preset: one row per field, one column per task, and the source.

    `kind` "ssm" gives s4 and s4d together (a cell reads `s4 / s4d` where they differ), "transformer"
    the LRA Transformer. Generated from `preset_config`, so it cannot drift from the code.
    """
    models = ("s4", "s4d") if kind == "ssm" else ("transformer",)
    cfgs = {(t, m): preset_config(t, m, "paper") for t in TASKS for m in models}
    lines = ["| field | " + " | ".join(TASKS) + " | source |", "|---" * (len(TASKS) + 2) + "|"]
    for key in _TABLE_FIELDS[kind]:
        cells = []
        for t in TASKS:
            vals = [_cell(cfgs[(t, m)], key) for m in models]
            cells.append(vals[0] if len(set(vals)) == 1 else " / ".join(vals))
        lines.append(f"| `{key}` | " + " | ".join(cells) + f" | {SOURCES[kind][key]} |")
    return "\n".join(lines)


def preset_tables_markdown() -> str:
    """The README section between the `presets` markers: both tables, their source files, differences."""
    parts = ["### `--preset paper`: every value and where it comes from", "",
             "`--preset paper` for `--model s4` and `--model s4d` (S4: the public state-spaces/s4 configs; "
             f"the task names of the files: {', '.join(f'{t}={f}' for t, f in _S4_FILE.items())}):", "",
             preset_table("ssm"), "",
             "Sources: " + "; ".join(f"{code} = {text}" for code, text in SOURCE_FILES["ssm"]) + ".", "",
             "Differences, deliberate or unavoidable:", ""]
    parts += [f"- {d}" for d in DIFFERENCES["ssm"]]
    parts += ["", "`--preset paper` for `--model transformer` (the LRA paper's Transformer):", "",
              preset_table("transformer"), "",
              "Sources: " + "; ".join(f"{code} = {text}" for code, text in SOURCE_FILES["transformer"]) + ".", "",
              "Differences:", ""]
    parts += [f"- {d}" for d in DIFFERENCES["transformer"]]
    parts += ["", "Schedules (`optim.schedule`, formulas in `experiments.lra.schedules.lr_multiplier`): `cosine` = "
              "linear warmup then half a cosine to 0 over `schedule_steps`; `rsqrt` = "
              "`lr * min(1, t/W) / sqrt(max(t, W))`; `cosine_lra` = `lr * min(1, t/W) * (1 + cos(pi * "
              "((max(t - W, 0) / T) mod 1))) / 2`. Print this with `python -m experiments.lra.presets --table`."]
    return "\n".join(parts)





def build_config(task: str, model: str, preset: str = "cpu-small", overrides: dict[str, str] | None = None) -> Config:
    """Preset, then command-line overrides, then `validate`: the config a run uses."""
    return apply_overrides(preset_config(task, model, preset), overrides or {})


def main(argv: list[str] | None = None) -> None:
    import argparse
    from experiments.lra.overrides import format_config

    p = argparse.ArgumentParser(prog="python -m experiments.lra.presets",
                                description="Print LRA presets: the README table or one resolved config.")
    p.add_argument("--table", action="store_true", help="print the markdown table of the paper presets")
    p.add_argument("--task", choices=TASKS, default="listops")
    p.add_argument("--model", choices=MODELS, default="s4")
    p.add_argument("--preset", choices=PRESETS, default="paper")
    args = p.parse_args(argv)
    print(preset_tables_markdown() if args.table else format_config(preset_config(args.task, args.model, args.preset)))


if __name__ == "__main__":
    main()
