"""The README's table of every `paper` preset value and the public file each comes from.

`python -m experiments.lra.config --table` prints it; a test compares it with the README so that
the table and the presets in `experiments/lra/config.py` cannot drift apart (docs/lra.md).
"""
from __future__ import annotations

from experiments.lra.config import PIXEL_TASKS, TASKS, Config, preset_config, sequence_length

S4_COMMIT = "62a14bb"  # state-spaces/s4 commit of the configs/experiment/lra/s4-*.yaml files read
_S4_FILE = {"listops": "listops", "text": "imdb", "retrieval": "aan", "image": "cifar", "pathfinder": "pathfinder",
            "pathx": "pathx"}
# Where each value of the `paper` preset comes from. Codes are explained by `SOURCE_FILES`.
SOURCES = {
    "ssm": {
        "data.batch_size": "E loader.batch_size", "data.max_len": "tasks.py (LRA lengths); D l_max",
        "data.pixel_input": "P encoder: linear on x/255", "model.d_model": "E model.d_model",
        "model.n_layers": "E model.n_layers", "model.d_state": "E layer.d_state", "model.n_ssm": "E layer.n_ssm",
        "model.init": "E layer.init", "model.bidirectional": "E layer.bidirectional",
        "model.dt_min": "E layer.dt_min", "model.dt_max": "E layer.dt_max", "model.dt_transform": "L dt_transform",
        "model.dropout": "E model.dropout", "model.tie_dropout": "E model.tie_dropout (absent: false)",
        "model.prenorm": "E model.prenorm", "model.norm": "E model.norm", "model.pooling": "E/P decoder.mode: pool",
        "model.pos": "none in S4", "model.head": "P decoder (retrieval: RetrievalDecoder)",
        "model.head_hidden": "P/RetrievalHead d_model", "model.head_act": "P decoder activation",
        "model.interaction": "RetrievalHead nli=True", "optim.lr": "E optimizer.lr",
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
        "model.n_layers": "C num_layers", "model.n_heads": "C num_heads", "model.d_mlp": "C mlp_dim",
        "model.dropout": "C dropout_rate (TM default 0.1)", "model.prenorm": "TM (LayerNorm before each sublayer)",
        "model.norm": "TM", "model.pooling": "C classifier_pool / pooling_mode", "model.pos": "C learn_pos_emb",
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
        "Path-X lr: commit 62a14bb of `s4-pathx.yaml` says 0.002, another stored version (8bfbb60) 0.001; "
        "62a14bb is the commit that holds all six `s4-*.yaml` files, so its values are used throughout.",
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
    "ssm": ["data.batch_size", "data.max_len", "data.pixel_input", "model.d_model", "model.n_layers", "model.d_state",
            "model.n_ssm", "model.init", "model.bidirectional", "model.dt_min", "model.dt_max", "model.dt_transform",
            "model.dropout", "model.tie_dropout", "model.prenorm", "model.norm", "model.pooling", "model.pos",
            "model.head", "model.head_hidden", "model.head_act", "model.interaction", "optim.lr", "optim.ssm_lr",
            "optim.dt_lr", "optim.weight_decay", "optim.decay_vectors", "optim.beta1", "optim.beta2", "optim.eps",
            "optim.schedule", "optim.warmup_steps", "optim.schedule_steps", "optim.min_lr_frac", "optim.grad_clip",
            "train.epochs", "train.max_steps", "train.seed", "train.amp"],
    "transformer": ["data.batch_size", "data.max_len", "data.pixel_input", "model.d_model", "model.n_layers",
                    "model.n_heads", "model.d_mlp", "model.dropout", "model.prenorm", "model.norm", "model.pooling",
                    "model.pos", "model.head", "model.head_hidden", "model.head_act", "model.interaction",
                    "optim.lr", "optim.weight_decay", "optim.decay_vectors", "optim.beta1", "optim.beta2",
                    "optim.eps", "optim.schedule", "optim.warmup_steps", "optim.schedule_steps", "optim.grad_clip",
                    "train.epochs", "train.max_steps", "train.seed", "train.amp"],
}


def _cell(cfg: Config, key: str) -> str:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
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
    parts += ["", "Schedules (`optim.schedule`, formulas in `experiments.lra.config.lr_multiplier`): `cosine` = "
              "linear warmup then half a cosine to 0 over `schedule_steps`; `rsqrt` = "
              "`lr * min(1, t/W) / sqrt(max(t, W))`; `cosine_lra` = `lr * min(1, t/W) * (1 + cos(pi * "
              "((max(t - W, 0) / T) mod 1))) / 2`. Print this with `python -m experiments.lra.config --table`."]
    return "\n".join(parts)


