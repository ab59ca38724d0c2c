"""LRA training configuration: one dataclass per section and the validation of every value.

Sections are `data`, `model`, `optim`, `train`. `validate(cfg)` checks every value (errors name the
field as on the command line and its allowed range). The task presets that fill these dataclasses
live in `experiments.lra.presets`, command-line overrides (`--section.field=value`) in
`experiments.lra.overrides`, the learning-rate formulas in `experiments.lra.schedules`; the tasks
themselves: `docs/lra.md`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from experiments.lra.schedules import SCHEDULES
from experiments.lra.tasks import PIXEL_TASKS, TASKS, task_info
from ssm.config import AttentionConfig, BlockConfig, Mamba2Config, MambaConfig, S4Config

MODELS = ("s4", "s4d", "transformer", "mamba", "mamba2")
SELECTIVE = ("mamba", "mamba2")  # causal-only layers: they need --model.bidirectional=false
PRESETS = ("paper", "cpu-small")
ATTENTION_POS = ("rope", "rope2d", "alibi")  # positions handled inside the attention layer


@dataclass
class DataConfig:
    max_len: int | None = None  # truncate every sequence to this length (None: the task's length)
    pathfinder_resolution: int | None = None  # None: 32 for pathfinder, 128 for pathx
    batch_size: int = 32  # per process; the presets' values are the published (single-process) batch
    eval_batch_size: int | None = None  # None: same as batch_size
    pixel_input: str = "real"  # pixel tasks: "real" (value/255 as one input channel) | "tokens" (256-way embedding)
    num_workers: int = 0
    pack: bool = False  # train on packed rows of whole examples with seq_idx (`experiments.lra.packing`)
    pack_len: int | None = None  # tokens per packed row; None: the longest example (`sequence_length`)


@dataclass
class ModelConfig:
    """The model: backbone size, pooling, positions, head, and the nested layer and block configs.

    `ssm` (`ssm.S4Config`) configures the S4/S4D layers, `attention` (`ssm.AttentionConfig`) the
    Transformer's, `mamba` / `mamba2` (`ssm.MambaConfig`, `ssm.Mamba2Config`) the selective layers,
    `block` (`ssm.BlockConfig`: prenorm, norm, d_ff) the residual block around any of them; the
    layer kind is the run's `model_name`. The selective layers are causal only: with them
    `bidirectional` must be false (their presets set it; true is refused, not silently ignored). Fields the model sets itself (`DERIVED`) cannot be
    overridden: `ssm.mode` (from the model name), the layers' `bidirectional` (from `bidirectional`),
    and the attention's positions, lengths and RoPE scaling (from `pos` and the `rope_*` fields).
    """

    d_model: int = 128
    n_layers: int = 4
    bidirectional: bool = True  # every block non-causal (the LRA models read the whole sequence)
    pooling: str = "mean"
    pos: str = "none"  # none | sinusoidal | learned (added at the input) | rope | rope2d | alibi (attention)
    head_hidden: int | None = None  # width of an MLP head ("mlp", "mlp2"); None: d_model
    head: str = "linear"  # pooled features -> logits: "linear" | "mlp" (one hidden layer) | "mlp2" (two)
    head_act: str = "gelu"  # activation of an MLP head: "gelu" | "relu"
    interaction: str = "nli"  # retrieval: "nli" ([u, v, u*v, u-v]) | "concat" ([u, v])
    rope_scaling: str = "none"  # pos=rope/rope2d: "none" or a scaling type of ssm.layers.rope
    rope_factor: float | None = None  # the scaling's `factor`
    rope_original_len: int | None = None  # original_max_position_embeddings; None: the training length
    rope_window: int | None = None  # ReRoPE window
    rope_params: str = ""  # further scaling keys as a JSON object, e.g. '{"beta_fast": 16}'
    ssm: S4Config = field(default_factory=S4Config)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    block: BlockConfig = field(default_factory=BlockConfig)


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
    # Under torchrun: "ddp" replicates the model on every rank; "fsdp" shards parameters, gradients
    # and optimizer state per block (FSDP2; SSM parameters stay float32 under bf16 autocast).
    strategy: str = "ddp"


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
    "data.pixel_input": ("real", "tokens"),
    "model.pooling": ("mean", "last", "cls"),
    "model.pos": ("none", "sinusoidal", "learned") + ATTENTION_POS,
    "model.head": ("linear", "mlp", "mlp2"),
    "model.head_act": ("gelu", "relu"),
    "train.strategy": ("ddp", "fsdp"),
    "model.interaction": ("nli", "concat"),
    "model.rope_scaling": _rope_types(),
    "model.block.norm": ("layer", "batch"),
    "model.ssm.dt_transform": ("exp", "softplus"),
    "optim.schedule": SCHEDULES,
    "train.device": ("auto", "cpu", "cuda"),
}
# Nested fields the model sets itself, and the field that sets each.
DERIVED = {
    "model.ssm.mode": "the model name (--model s4: dplr, s4d: diag)",
    "model.ssm.bidirectional": "--model.bidirectional", "model.attention.bidirectional": "--model.bidirectional",
    "model.ssm.l_max": "the task's sequence length (config.sequence_length)",
    "model.attention.pos": "--model.pos", "model.attention.max_len": "--model.pos and the sequence length",
    "model.attention.grid_width": "--model.pos=rope2d and the image size",
    "model.attention.rope_scaling": "--model.rope_scaling, --model.rope_factor, --model.rope_window, "
                                    "--model.rope_original_len and --model.rope_params",
}
# Flat model keys of earlier versions -> where each lives now.
MOVED = {**{f"model.{k}": f"model.ssm.{k}" for k in ("d_state", "init", "dt_min", "dt_max", "n_ssm",
                                                      "dt_transform", "tie_dropout")},
         "model.n_heads": "model.attention.n_heads", "model.d_mlp": "model.attention.d_mlp",
         "model.rope_base": "model.attention.rope_base", "model.prenorm": "model.block.prenorm",
         "model.norm": "model.block.norm", "model.dropout": "model.ssm.dropout (S4/S4D) or model.attention.dropout"}


def derive(cfg: Config) -> Config:
    """Set the nested fields that follow from others (`DERIVED`: S4 mode, causality); returns `cfg`."""
    m = cfg.model
    if cfg.model_name in ("s4", "s4d"):
        m.ssm.mode = "dplr" if cfg.model_name == "s4" else "diag"
    m.ssm.bidirectional = m.attention.bidirectional = m.bidirectional
    return cfg


def config_from_dict(stored: dict) -> Config:
    """The `Config` of `Config.to_dict()` output (a checkpoint's `config`); unknown keys are ignored."""
    def make(cls, values: dict):
        kinds = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for name, value in (values or {}).items():
            if name not in kinds:
                continue
            sub = kinds[name].default_factory
            out[name] = make(sub, value) if dataclasses.is_dataclass(sub) and isinstance(value, dict) else value
        return cls(**out)
    sections = {name: make(cls, stored.get(name, {})) for name, cls in SECTIONS.items()}
    return Config(task=stored["task"], model_name=stored["model_name"], preset=stored.get("preset", "cpu-small"),
                  **sections)


def check_names(task: str, model: str, preset: str) -> None:
    """ValueError unless task, model and preset are known names."""
    for name, value, allowed in (("task", task, TASKS), ("model", model, MODELS), ("preset", preset, PRESETS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")




# ---- validation ------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Checks:
    """Collects one message per invalid field, each naming the field as on the command line."""

    def __init__(self, cfg: Config):
        self.cfg, self.errors = cfg, []

    def get(self, key: str):
        return get_field(self.cfg, key)

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
        allowed = CHOICES[key]
        if self.get(key) not in allowed:
            self.fail(key, f"one of {allowed}")


def get_field(cfg: Config, key: str):
    """The value of a dotted key (`model.ssm.d_state`) of `cfg`."""
    obj = cfg
    for name in key.split("."):
        obj = getattr(obj, name)
    return obj


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


def _check_data(c: Checks) -> None:
    c.integer("data.max_len", 1, none_ok=True)
    res = c.cfg.data.pathfinder_resolution
    if res is not None and (c.cfg.task not in ("pathfinder", "pathx") or res not in (32, 64, 128, 256)):
        c.fail("data.pathfinder_resolution", "None, or 32, 64, 128 or 256 for the pathfinder/pathx tasks")
    c.integer("data.batch_size", 1)
    c.integer("data.eval_batch_size", 1, none_ok=True)
    c.choice("data.pixel_input")
    c.integer("data.num_workers", 0)
    if not c.errors:  # the sequence length needs a valid max_len and resolution
        from experiments.lra.packing import lra_pack_errors
        c.errors += lra_pack_errors(c.cfg, sequence_length(c.cfg))


def _check_ssm(c: Checks) -> None:
    m, s = c.cfg.model, c.cfg.model.ssm
    if not (_is_int(s.d_state) and s.d_state >= 2 and s.d_state % 2 == 0):
        c.fail("model.ssm.d_state", "an even integer >= 2 (N/2 complex conjugate pairs)")
    from ssm.hippo import DIAG_INITS
    from ssm.layers.s4 import DPLR_INITS
    inits = DIAG_INITS if c.cfg.model_name == "s4d" else DPLR_INITS
    if s.init not in inits:
        c.fail("model.ssm.init", f"one of {inits} for --model {c.cfg.model_name}")
    c.real("model.ssm.dt_min", 0.0, lo_open=True)
    c.real("model.ssm.dt_max", 0.0, lo_open=True)
    if _is_real(s.dt_min) and _is_real(s.dt_max) and not s.dt_min <= s.dt_max:
        c.errors.append(f"--model.ssm.dt_min={s.dt_min!r} must not exceed --model.ssm.dt_max={s.dt_max!r}")
    c.integer("model.ssm.n_ssm", 1, none_ok=True)
    if _is_int(s.n_ssm) and s.n_ssm >= 1 and _is_int(m.d_model) and m.d_model >= 1 and m.d_model % s.n_ssm:
        c.errors.append(f"--model.ssm.n_ssm={s.n_ssm} must divide --model.d_model={m.d_model}")
    c.choice("model.ssm.dt_transform")
    c.flag("model.ssm.tie_dropout")
    c.real("model.ssm.dropout", 0.0, 1.0)
    if m.pos in ATTENTION_POS:
        c.errors.append(f"--model.pos={m.pos} needs --model transformer (positions inside attention)")


def _check_transformer(c: Checks) -> None:
    m, a = c.cfg.model, c.cfg.model.attention
    c.integer("model.attention.n_heads", 1)
    c.integer("model.attention.d_mlp", 1, none_ok=True)
    c.real("model.attention.dropout", 0.0, 1.0)
    c.real("model.attention.rope_base", 1.0, lo_open=True)
    if not (_is_int(a.n_heads) and a.n_heads >= 1 and _is_int(m.d_model) and m.d_model >= 1):
        return
    if m.d_model % a.n_heads:
        c.errors.append(f"--model.attention.n_heads={a.n_heads} must divide --model.d_model={m.d_model}")
        return
    head_dim = m.d_model // a.n_heads
    if m.pos == "rope" and head_dim % 2:
        c.errors.append(f"--model.pos=rope needs an even head size d_model / n_heads, got {head_dim}")
    if m.pos == "rope2d" and (head_dim % 4 or c.cfg.task not in PIXEL_TASKS):
        c.errors.append(f"--model.pos=rope2d needs a pixel task {PIXEL_TASKS} and a head size divisible by 4, "
                        f"got task {c.cfg.task!r}, head size {head_dim}")


def _check_selective(c: Checks) -> None:
    m, name = c.cfg.model, c.cfg.model_name
    if m.bidirectional is True:
        c.errors.append(f"--model {name} is causal only (a selective scan runs left to right): set "
                        "--model.bidirectional=false (its presets do)")
    if m.pos in ATTENTION_POS:
        c.errors.append(f"--model.pos={m.pos} needs --model transformer (positions inside attention)")
    if m.block.d_ff is not None:
        c.fail("model.block.d_ff", f"None for --model {name} (the selective layers gate their own output)")
    s = getattr(m, name)
    for key in ("d_state", "d_conv", "expand"):
        c.integer(f"model.{name}.{key}", 1)
    c.real(f"model.{name}.dt_min", 0.0, lo_open=True)
    c.real(f"model.{name}.dt_max", 0.0, lo_open=True)
    if _is_real(s.dt_min) and _is_real(s.dt_max) and not s.dt_min <= s.dt_max:
        c.errors.append(f"--model.{name}.dt_min={s.dt_min!r} must not exceed --model.{name}.dt_max={s.dt_max!r}")
    if name == "mamba2":
        c.integer("model.mamba2.headdim", 1)
        c.integer("model.mamba2.ngroups", 1)
        c.integer("model.mamba2.chunk_size", 1)
        d_ssm = s.d_ssm if s.d_ssm is not None else (s.expand * m.d_model if _is_int(s.expand) and
                                                      _is_int(m.d_model) else None)
        if _is_int(d_ssm) and _is_int(s.headdim) and s.headdim >= 1 and d_ssm % s.headdim:
            c.errors.append(f"--model.mamba2.headdim={s.headdim} must divide d_ssm = {d_ssm} "
                            "(expand * d_model unless --model.mamba2.d_ssm is set)")
        elif (_is_int(d_ssm) and _is_int(s.headdim) and _is_int(s.ngroups) and s.headdim >= 1 and s.ngroups >= 1
              and (d_ssm // s.headdim) % s.ngroups):
            c.errors.append(f"--model.mamba2.ngroups={s.ngroups} must divide the number of heads "
                            f"{d_ssm // s.headdim}")


def _check_rope(c: Checks) -> None:
    m = c.cfg.model
    c.choice("model.rope_scaling")
    c.real("model.rope_factor", 0.0, lo_open=True, none_ok=True)
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


def _check_model(c: Checks) -> None:
    c.integer("model.d_model", 1)
    c.integer("model.n_layers", 1)
    for key in ("pooling", "pos", "head", "head_act", "interaction", "block.norm"):
        c.choice(f"model.{key}")
    for key in ("bidirectional", "block.prenorm"):
        c.flag(f"model.{key}")
    c.integer("model.block.d_ff", 1, none_ok=True)
    c.integer("model.head_hidden", 2 if c.cfg.model.head == "mlp2" else 1, none_ok=True)
    if c.cfg.model_name == "transformer":
        _check_transformer(c)
    elif c.cfg.model_name in SELECTIVE:
        _check_selective(c)
    else:
        _check_ssm(c)
    _check_rope(c)


def check_optim(c: Checks) -> None:
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


def check_train(c: Checks) -> None:
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
    c.choice("train.strategy")


def validate(cfg: Config) -> Config:
    """Check every value of `cfg` (types, ranges, finiteness, divisibility, names); returns `cfg`.

    Raises ValueError naming each bad field as on the command line (`--model.ssm.d_state`) with its
    allowed range. Cheap (no data, no model): call it before loading data or creating a run folder.
    """
    check_names(cfg.task, cfg.model_name, cfg.preset)
    c = Checks(cfg)
    _check_data(c)
    _check_model(c)
    check_optim(c)
    check_train(c)
    if c.errors:
        raise ValueError("invalid config: " + "; ".join(c.errors) if len(c.errors) > 1 else c.errors[0])
    return cfg
