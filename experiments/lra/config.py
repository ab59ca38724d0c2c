"""LRA training configuration: one dataclass per section, presets, overrides, validation, schedules.

Sections are `data`, `model`, `optim`, `train`; any field can be overridden from the command line as
`--section.field=value` (or `--section.field value`), with the value parsed by the field's type.
`build_config(task, model, preset, overrides)` is the one entry point: preset, then overrides, then
`validate` (every value checked, errors name the field and the allowed range).

Presets (full table with the public file of every value: README "Long Range Arena", or
`python -m experiments.lra.config --table`; the tasks themselves: `docs/lra.md`):
- `paper`: `s4` equals the public S4 LRA configurations of the state-spaces/s4 repository
  (`configs/experiment/lra/s4-*.yaml` and what they inherit), `s4d` is the same with the diagonal
  layer (no public S4D LRA config exists: see `preset_table.DIFFERENCES`), `transformer` equals the LRA paper's
  Transformer configurations (google-research/long-range-arena, `lra_benchmarks/*/configs/`).
- `cpu-small`: narrow, shallow models for CPU runs. ListOps keeps its full length (the generator
  writes at most 2,000 tokens, the task length); Text and Retrieval are capped at 1,024 bytes on
  purpose (longer documents are truncated, and the data loader reports how many); the image tasks
  keep their full length. Its ListOps row is the quick start.

Learning-rate schedules (`lr_multiplier`): "cosine" (linear warmup, then half a cosine to
`min_lr_frac`), "rsqrt" (the LRA text tasks: linear warmup times 1/sqrt(max(step, warmup))) and
"cosine_lra" (the LRA image tasks: warmup times a cosine over `schedule_steps` counted after warmup).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from experiments.lra.tasks import PIXEL_TASKS, TASKS  # noqa: F401  (re-exported names)
from experiments.lra.tasks import task as task_info

MODELS = ("s4", "s4d", "transformer")
PRESETS = ("paper", "cpu-small")
SCHEDULES = ("cosine", "rsqrt", "cosine_lra")
ATTENTION_POS = ("rope", "rope2d", "alibi")  # positions handled inside the attention layer


@dataclass
class DataConfig:
    max_len: int | None = None  # truncate every sequence to this length (None: the task's length)
    pathfinder_resolution: int | None = None  # None: 32 for pathfinder, 128 for pathx
    batch_size: int = 32  # per process; the presets' values are the published (single-process) batch
    eval_batch_size: int | None = None  # None: same as batch_size
    pixel_input: str = "real"  # pixel tasks: "real" (value/255 as one input channel) | "tokens" (256-way embedding)
    num_workers: int = 0


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 64  # real state size N (S4D stores N // 2 conjugate pairs)
    init: str | None = None  # S4D Lambda init / S4 measure; None: the layer's default
    bidirectional: bool = True
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dropout: float = 0.0
    prenorm: bool = True
    norm: str = "layer"  # SSM blocks: "layer" | "batch" (S4's LRA runs used batch norm)
    pooling: str = "mean"
    pos: str = "none"  # none | sinusoidal | learned (added at the input) | rope | rope2d | alibi (attention)
    n_heads: int = 8  # transformer only
    d_mlp: int | None = None  # transformer only; None: the block's default
    head_hidden: int | None = None  # width of an MLP head ("mlp", "mlp2"); None: d_model
    n_ssm: int | None = None  # SSM layers: A, B (and P) shared by d_model / n_ssm channels each; None: one per channel
    dt_transform: str = "exp"  # step size from its parameter: "exp" | "softplus"
    tie_dropout: bool = False  # one dropout mask per channel and example, shared along the sequence
    head: str = "linear"  # pooled features -> logits: "linear" | "mlp" (one hidden layer) | "mlp2" (two)
    head_act: str = "gelu"  # activation of an MLP head: "gelu" | "relu"
    interaction: str = "nli"  # retrieval: "nli" ([u, v, u*v, u-v]) | "concat" ([u, v])
    rope_scaling: str = "none"  # pos=rope/rope2d: "none" or a scaling type of ssm.layers.rope
    rope_factor: float | None = None  # the scaling's `factor`
    rope_base: float = 10000.0
    rope_original_len: int | None = None  # original_max_position_embeddings; None: the training length
    rope_window: int | None = None  # ReRoPE window
    rope_params: str = ""  # further scaling keys as a JSON object, e.g. '{"beta_fast": 16}'


@dataclass
class OptimConfig:
    lr: float = 1e-3
    ssm_lr: float | None = 1e-3  # A, B (and P) of the SSM layers, no weight decay; None: the global lr
    dt_lr: float | None = 1e-3  # the SSM step size dt, no weight decay; None: the global lr
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_frac: float = 0.01  # warmup as a fraction of the schedule (used when warmup_steps is None)
    warmup_steps: int | None = None  # warmup in optimizer steps; overrides warmup_frac
    schedule_steps: int | None = None  # length of the cosine schedule; None: epochs x steps per epoch
    schedule: str = "cosine"  # "cosine" | "rsqrt" | "cosine_lra"; formulas: `lr_multiplier`
    min_lr_frac: float = 0.0  # "cosine": the multiplier at the end of the schedule
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    decay_vectors: bool = False  # True: biases and norm scales get weight decay too (the public setups)


@dataclass
class TrainConfig:
    epochs: int = 10
    # Stop (with a checkpoint) after this many steps in total; the lr schedule still spans all epochs.
    max_steps: int | None = None
    seed: int = 0
    log_every: int = 20
    eval_every: int | None = None  # extra validation every this many steps (always at each epoch end)
    checkpoint_every: int | None = None  # also write last.pt every this many steps (always at epoch ends)
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    progress: bool = True
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int | None = None  # CPU threads for torch (None: torch's default, one per core)


@dataclass
class Config:
    task: str = "listops"
    model_name: str = "s4d"
    preset: str = "cpu-small"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig}


def _rope_types() -> tuple[str, ...]:
    from ssm.layers.rope import ROPE_TYPES

    return ("none",) + tuple(ROPE_TYPES)


CHOICES = {
    ("data", "pixel_input"): ("real", "tokens"),
    ("model", "norm"): ("layer", "batch"),
    ("model", "pooling"): ("mean", "last", "cls"),
    ("model", "pos"): ("none", "sinusoidal", "learned") + ATTENTION_POS,
    ("model", "dt_transform"): ("exp", "softplus"),
    ("model", "head"): ("linear", "mlp", "mlp2"),
    ("model", "head_act"): ("gelu", "relu"),
    ("model", "interaction"): ("nli", "concat"),
    ("model", "rope_scaling"): _rope_types(),
    ("optim", "schedule"): SCHEDULES,
    ("train", "device"): ("auto", "cpu", "cuda"),
}

# ---- presets ---------------------------------------------------------------------------------
# S4 (state-spaces/s4 configs/experiment/lra/s4-<file>.yaml at 62a14bb): per task, the values that
# differ between tasks; the rest is common (`_S4_COMMON`).
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
    "pathx": dict(d_model=256, d_state=64, n_ssm=None, prenorm=True, dropout=0.0, tie_dropout=False, lr=0.002,
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


def _check_names(task: str, model: str, preset: str) -> None:
    for name, value, allowed in (("task", task, TASKS), ("model", model, MODELS), ("preset", preset, PRESETS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _ssm_paper(cfg: Config) -> None:
    p = _S4_PAPER[cfg.task]
    cfg.model = dataclasses.replace(
        cfg.model, d_model=p["d_model"], n_layers=6, d_state=p["d_state"], n_ssm=p["n_ssm"], init="legs",
        bidirectional=True, dt_min=p["dt_min"], dt_max=0.1, dt_transform="softplus", dropout=p["dropout"],
        tie_dropout=p["tie_dropout"], prenorm=p["prenorm"], norm="batch", pooling="mean", pos="none",
        head="linear", head_act="gelu", interaction="nli", head_hidden=None)
    if cfg.task == "retrieval":
        cfg.model = dataclasses.replace(cfg.model, head="mlp", head_act="gelu", head_hidden=p["d_model"])
    cfg.optim = dataclasses.replace(
        cfg.optim, lr=p["lr"], ssm_lr=1e-3, dt_lr=p["dt_lr"], weight_decay=0.05, beta1=0.9, beta2=0.999,
        eps=1e-8, schedule="cosine", warmup_steps=p["warmup"], schedule_steps=p["steps"],
        warmup_frac=p["warmup"] / p["steps"], min_lr_frac=0.0, grad_clip=0.0, decay_vectors=True)
    cfg.data = dataclasses.replace(cfg.data, batch_size=p["batch"], max_len=None, pixel_input="real")
    cfg.train = dataclasses.replace(cfg.train, epochs=p["epochs"], seed=p["seed"], max_steps=None)


def _transformer_paper(cfg: Config) -> None:
    p = _TRANSFORMER_PAPER[cfg.task]
    cfg.model = dataclasses.replace(
        cfg.model, n_layers=p["n_layers"], n_heads=p["n_heads"], d_model=p["d_model"], d_mlp=p["d_mlp"],
        dropout=p["dropout"], pooling=p["pooling"], pos=p["pos"], prenorm=True, norm="layer",
        head="mlp2" if cfg.task == "retrieval" else "mlp", head_act="relu", head_hidden=p["d_mlp"],
        interaction="concat")
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
    head = "mlp" if cfg.task == "retrieval" else "linear"
    if cfg.model_name == "transformer":
        cfg.model = dataclasses.replace(cfg.model, d_model=d_model, n_layers=n_layers, n_heads=4, head=head,
                                        d_mlp=2 * d_model, pooling="mean", pos="sinusoidal")
        cfg.optim.lr = 1e-3
    else:
        # Post-norm + batch norm reached 39.5% ListOps val accuracy after 500 steps where pre-norm +
        # layer norm reached 35.5% (same data, seed and lr).
        cfg.model = dataclasses.replace(cfg.model, d_model=d_model, n_layers=n_layers, d_state=64, head=head,
                                        bidirectional=True, prenorm=False, norm="batch", pooling="mean",
                                        pos="none")


def preset_config(task: str, model: str, preset: str = "cpu-small") -> Config:
    """The configuration of `preset` for `task` and `model` ("s4" | "s4d" | "transformer"), validated."""
    _check_names(task, model, preset)
    cfg = Config(task=task, model_name=model, preset=preset)
    # S4 fed pixels as real values; the LRA Transformer embeds the 256 intensities as tokens.
    cfg.data.pixel_input = "tokens" if model == "transformer" else "real"
    if task == "pathx":
        cfg.model.dt_min = 1e-4
    if preset == "paper":
        (_transformer_paper if model == "transformer" else _ssm_paper)(cfg)
    else:
        _cpu_small(cfg)
    validate(cfg)
    return cfg


# ---- overrides -------------------------------------------------------------------------------

def _field_types(section_cls) -> dict:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _parse_value(key: str, text: str, tp):
    """Parse `text` as type `tp` (bool, int, float, str, or `X | None`)."""
    args = typing.get_args(tp)
    if type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}: expected a boolean (true/false), got {text!r}")
    try:
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise ValueError(f"--{key}: expected {tp.__name__}, got {text!r}") from None
    if tp is str:
        return text
    raise TypeError(f"--{key}: unsupported field type {tp!r}")


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
    """Set `section.field` keys (values as strings) on `cfg` in place, type-checked, then `validate`."""
    for key, text in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ValueError(f"unknown config key --{key}: use --section.field with section one of {tuple(SECTIONS)}")
        types = _field_types(SECTIONS[section])
        if name not in types:
            raise ValueError(f"unknown field --{key}; fields of [{section}]: {', '.join(types)}")
        value = _parse_value(key, text, types[name])
        allowed = CHOICES.get((section, name))
        if allowed is not None and value not in allowed:
            raise ValueError(f"--{key} must be one of {allowed}, got {value!r}")
        setattr(getattr(cfg, section), name, value)
    validate(cfg)
    return cfg


def build_config(task: str, model: str, preset: str = "cpu-small", overrides: dict[str, str] | None = None) -> Config:
    """Preset, then command-line overrides, then `validate`: the config a run uses."""
    return apply_overrides(preset_config(task, model, preset), overrides or {})


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate `--section.field=value` / `--section.field value` tokens from the other arguments."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        head = tok[2:].split("=", 1)[0] if tok.startswith("--") else ""
        if "." in head:
            if "=" in tok:
                overrides[head] = tok.split("=", 1)[1]
            elif i + 1 < len(argv):
                overrides[head] = argv[i + 1]
                i += 1
            else:
                raise ValueError(f"{tok}: missing value (use {tok}=VALUE)")
        else:
            rest.append(tok)
        i += 1
    return rest, overrides


def format_config(cfg: Config) -> str:
    """One `section.field = value` line per field, for logs and --help."""
    lines = [f"task = {cfg.task}", f"model = {cfg.model_name}", f"preset = {cfg.preset}"]
    for section in SECTIONS:
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"{section}.{key} = {value}")
    return "\n".join(lines)


# ---- validation ------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checks:
    """Collects one message per invalid field, each naming the field as on the command line."""

    def __init__(self, cfg: Config):
        self.cfg, self.errors = cfg, []

    def get(self, key: str):
        section, name = key.split(".")
        return getattr(getattr(self.cfg, section), name)

    def fail(self, key: str, want: str) -> None:
        self.errors.append(f"--{key} must be {want}, got {self.get(key)!r}")

    def integer(self, key: str, lo: int, *, none_ok: bool = False) -> None:
        v = self.get(key)
        if not ((none_ok and v is None) or (_is_int(v) and v >= lo)):
            self.fail(key, f"an integer >= {lo}" + (" or None" if none_ok else ""))

    def real(self, key: str, lo: float, hi: float | None = None, *, lo_open=False, hi_open=True,
             none_ok=False) -> None:
        v = self.get(key)
        if none_ok and v is None:
            return
        ok = _is_real(v) and (v > lo if lo_open else v >= lo)
        if hi is not None:
            ok = ok and (v < hi if hi_open else v <= hi)
        if not ok:
            rng = (f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if hi is not None
                   else f"{'>' if lo_open else '>='} {lo:g}")
            self.fail(key, f"a finite number {rng}" + (" or None" if none_ok else ""))

    def flag(self, key: str) -> None:
        if not isinstance(self.get(key), bool):
            self.fail(key, "true or false")

    def choice(self, key: str) -> None:
        allowed = CHOICES[tuple(key.split("."))]
        if self.get(key) not in allowed:
            self.fail(key, f"one of {allowed}")


def sequence_length(cfg: Config) -> int:
    """Length of one training sequence: the task's (or the Pathfinder resolution's), capped by max_len."""
    length = task_info(cfg.task).resolution_len(cfg.data.pathfinder_resolution)
    return length if cfg.data.max_len is None else min(length, cfg.data.max_len)


def rope_scaling_dict(cfg: Config) -> dict | None:
    """The `rope_scaling` dict for `ssm.layers.attention` from the `model.rope_*` fields (None: plain RoPE)."""
    m = cfg.model
    if m.rope_scaling == "none":
        return None
    scaling = {"type": m.rope_scaling}
    if m.rope_factor is not None:
        scaling["factor"] = m.rope_factor
    if m.rope_window is not None:
        scaling["window"] = m.rope_window
    if m.rope_scaling in ("dynamic", "yarn", "llama3", "longrope"):
        length = sequence_length(cfg) + (1 if m.pooling == "cls" else 0)
        scaling["original_max_position_embeddings"] = m.rope_original_len or length
    if m.rope_params:
        scaling.update(json.loads(m.rope_params))
    return scaling


def _check_data(c: _Checks) -> None:
    c.integer("data.max_len", 1, none_ok=True)
    res = c.cfg.data.pathfinder_resolution
    if res is not None and (c.cfg.task not in ("pathfinder", "pathx") or res not in (32, 64, 128, 256)):
        c.fail("data.pathfinder_resolution", "None, or 32, 64, 128 or 256 for the pathfinder/pathx tasks")
    c.integer("data.batch_size", 1)
    c.integer("data.eval_batch_size", 1, none_ok=True)
    c.choice("data.pixel_input")
    c.integer("data.num_workers", 0)


def _check_ssm(c: _Checks) -> None:
    m = c.cfg.model
    if not (_is_int(m.d_state) and m.d_state >= 2 and m.d_state % 2 == 0):
        c.fail("model.d_state", "an even integer >= 2 (N/2 complex conjugate pairs)")
    from ssm.hippo import DIAG_INITS
    from ssm.layers.s4 import DPLR_INITS
    inits = DIAG_INITS if c.cfg.model_name == "s4d" else DPLR_INITS
    if m.init is not None and m.init not in inits:
        c.fail("model.init", f"None or one of {inits} for --model {c.cfg.model_name}")
    c.real("model.dt_min", 0.0, lo_open=True)
    c.real("model.dt_max", 0.0, lo_open=True)
    if _is_real(m.dt_min) and _is_real(m.dt_max) and not m.dt_min <= m.dt_max:
        c.errors.append(f"--model.dt_min={m.dt_min!r} must not exceed --model.dt_max={m.dt_max!r}")
    c.integer("model.n_ssm", 1, none_ok=True)
    if _is_int(m.n_ssm) and m.n_ssm >= 1 and _is_int(m.d_model) and m.d_model >= 1 and m.d_model % m.n_ssm:
        c.errors.append(f"--model.n_ssm={m.n_ssm} must divide --model.d_model={m.d_model}")
    if m.pos in ATTENTION_POS:
        c.errors.append(f"--model.pos={m.pos} needs --model transformer (positions inside attention)")


def _check_transformer(c: _Checks) -> None:
    m = c.cfg.model
    c.integer("model.n_heads", 1)
    c.integer("model.d_mlp", 1, none_ok=True)
    if not (_is_int(m.n_heads) and m.n_heads >= 1 and _is_int(m.d_model) and m.d_model >= 1):
        return
    if m.d_model % m.n_heads:
        c.errors.append(f"--model.n_heads={m.n_heads} must divide --model.d_model={m.d_model}")
        return
    head_dim = m.d_model // m.n_heads
    if m.pos == "rope" and head_dim % 2:
        c.errors.append(f"--model.pos=rope needs an even head size d_model / n_heads, got {head_dim}")
    if m.pos == "rope2d" and (head_dim % 4 or c.cfg.task not in PIXEL_TASKS):
        c.errors.append(f"--model.pos=rope2d needs a pixel task {PIXEL_TASKS} and a head size divisible by 4, "
                        f"got task {c.cfg.task!r}, head size {head_dim}")


def _check_rope(c: _Checks) -> None:
    m = c.cfg.model
    c.choice("model.rope_scaling")
    c.real("model.rope_factor", 0.0, lo_open=True, none_ok=True)
    c.real("model.rope_base", 1.0, lo_open=True)
    c.integer("model.rope_original_len", 1, none_ok=True)
    c.integer("model.rope_window", 1, none_ok=True)
    if m.rope_params:
        try:
            extra = json.loads(m.rope_params)
        except json.JSONDecodeError as e:
            c.fail("model.rope_params", f"a JSON object ({e})")
            return
        if not isinstance(extra, dict):
            c.fail("model.rope_params", "a JSON object")
            return
    if m.rope_scaling == "none":
        if m.rope_factor is not None or m.rope_window is not None or m.rope_params:
            c.errors.append("--model.rope_factor / rope_window / rope_params need --model.rope_scaling")
        return
    if m.pos not in ("rope", "rope2d"):
        c.errors.append(f"--model.rope_scaling={m.rope_scaling} needs --model.pos=rope or rope2d, got {m.pos!r}")
        return
    if c.errors:
        return
    from ssm.layers.rope import parse_scaling
    try:
        parse_scaling(rope_scaling_dict(c.cfg))
    except (ValueError, TypeError) as e:
        c.errors.append(f"--model.rope_scaling={m.rope_scaling}: {e} (set it with --model.rope_factor, "
                        "--model.rope_window, --model.rope_original_len or --model.rope_params)")


def _check_model(c: _Checks) -> None:
    c.integer("model.d_model", 1)
    c.integer("model.n_layers", 1)
    for key in ("norm", "pooling", "pos", "dt_transform", "head", "head_act", "interaction"):
        c.choice(f"model.{key}")
    for key in ("bidirectional", "prenorm", "tie_dropout"):
        c.flag(f"model.{key}")
    c.real("model.dropout", 0.0, 1.0)
    c.integer("model.head_hidden", 2 if c.cfg.model.head == "mlp2" else 1, none_ok=True)
    if c.cfg.model_name == "transformer":
        _check_transformer(c)
    else:
        _check_ssm(c)
    _check_rope(c)


def _check_optim(c: _Checks) -> None:
    o = c.cfg.optim
    c.real("optim.lr", 0.0, lo_open=True)
    c.real("optim.ssm_lr", 0.0, lo_open=True, none_ok=True)
    c.real("optim.dt_lr", 0.0, lo_open=True, none_ok=True)
    c.real("optim.weight_decay", 0.0)
    c.real("optim.beta1", 0.0, 1.0)
    c.real("optim.beta2", 0.0, 1.0)
    c.real("optim.eps", 0.0, lo_open=True)
    c.real("optim.warmup_frac", 0.0, 1.0)
    c.integer("optim.warmup_steps", 0, none_ok=True)
    c.integer("optim.schedule_steps", 1, none_ok=True)
    c.choice("optim.schedule")
    c.real("optim.min_lr_frac", 0.0, 1.0, hi_open=False)
    c.real("optim.grad_clip", 0.0)
    c.flag("optim.decay_vectors")
    if o.schedule == "rsqrt" and not (_is_int(o.warmup_steps) and o.warmup_steps >= 1):
        c.fail("optim.warmup_steps", "an integer >= 1 with --optim.schedule=rsqrt (lr ~ 1/sqrt(max(step, warmup)))")
    if (o.schedule == "cosine" and _is_int(o.warmup_steps) and _is_int(o.schedule_steps)
            and o.warmup_steps > o.schedule_steps):
        c.errors.append(f"--optim.warmup_steps={o.warmup_steps} must not exceed "
                        f"--optim.schedule_steps={o.schedule_steps}")


def _check_train(c: _Checks) -> None:
    c.integer("train.epochs", 1)
    c.integer("train.max_steps", 0, none_ok=True)
    c.integer("train.seed", 0)
    c.integer("train.log_every", 1)
    c.integer("train.eval_every", 1, none_ok=True)
    c.integer("train.checkpoint_every", 1, none_ok=True)
    c.flag("train.amp")
    c.flag("train.progress")
    c.choice("train.device")
    c.integer("train.threads", 1, none_ok=True)


def validate(cfg: Config) -> Config:
    """Check every value of `cfg` (types, ranges, finiteness, divisibility, names); returns `cfg`.

    Raises ValueError naming each bad field as on the command line (`--model.d_state`) with its
    allowed range. Cheap (no data, no model): call it before loading data or creating a run folder.
    """
    _check_names(cfg.task, cfg.model_name, cfg.preset)
    c = _Checks(cfg)
    _check_data(c)
    _check_model(c)
    _check_optim(c)
    _check_train(c)
    if c.errors:
        raise ValueError("invalid config: " + "; ".join(c.errors) if len(c.errors) > 1 else c.errors[0])
    return cfg


# ---- learning-rate schedules -----------------------------------------------------------------

def warmup_and_total(optim: OptimConfig, total_steps: int) -> tuple[int, int]:
    """(warmup steps W, schedule length T): `schedule_steps` or `total_steps` (epochs x steps per
    epoch, as the trainer counts them), and `warmup_steps` or `round(warmup_frac * T)`."""
    T = optim.schedule_steps if optim.schedule_steps is not None else max(int(total_steps), 1)
    W = optim.warmup_steps if optim.warmup_steps is not None else int(round(optim.warmup_frac * T))
    return W, T


def lr_multiplier(optim: OptimConfig, step: int, total_steps: int) -> float:
    """Factor on each parameter group's lr before optimizer step `step` (0 for the first step).

    With W, T = `warmup_and_total(optim, total_steps)` and t = step:
    - "cosine" (S4; `get_cosine_schedule_with_warmup` of `transformers`): t / W for t < W, then
      m + (1 - m) * (1 + cos(pi * p)) / 2 with p = min((t - W) / (T - W), 1), m = `min_lr_frac`.
    - "rsqrt" (LRA ListOps/Text/Retrieval): min(1, t / W) / sqrt(max(t, W)); the lr field is the
      constant in front, so the peak lr is lr / sqrt(W).
    - "cosine_lra" (LRA Image/Pathfinder/Path-X): min(1, t / W) * (1 + cos(pi * (q mod 1))) / 2 with
      q = max(t - W, 0) / T (T = the cycle length, counted after warmup).
    Use as `torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(cfg.optim, s, total))`.
    """
    W, T = warmup_and_total(optim, total_steps)
    t = float(step)
    if optim.schedule == "rsqrt":
        return min(1.0, t / W) / math.sqrt(max(t, W))
    if optim.schedule == "cosine_lra":
        warm = min(1.0, t / W) if W > 0 else 1.0
        q = max(t - W, 0.0) / T
        return warm * 0.5 * (1.0 + math.cos(math.pi * (q % 1.0)))
    if t < W:
        return t / W
    p = min((t - W) / max(T - W, 1), 1.0)
    m = optim.min_lr_frac
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m experiments.lra.config",
                                description="Print LRA presets: the README table or one resolved config.")
    p.add_argument("--table", action="store_true", help="print the markdown table of the paper presets")
    p.add_argument("--task", choices=TASKS, default="listops")
    p.add_argument("--model", choices=MODELS, default="s4")
    p.add_argument("--preset", choices=PRESETS, default="paper")
    args = p.parse_args(argv)
    if args.table:
        from experiments.lra.preset_table import preset_tables_markdown
    print(preset_tables_markdown() if args.table else format_config(preset_config(args.task, args.model, args.preset)))


if __name__ == "__main__":
    main()
