"""Configuration of one synthetic-task run: sections, presets, command-line overrides, validation.

Sections (overridable as `--section.field=value`):

- `task`: the task's own knobs, the fields of its frozen config (`MQARConfig`, ...; `data.TASKS`),
  e.g. `--task.num_kv_pairs=8 --task.seq_len=128`.
- `data`: batch sizes, how many samples each split holds, the test lengths, packing (`pack`,
  `pack_len`: training rows of several whole samples, `experiments.lra.packing`).
- `model`: width, depth and one nested config per layer family (`--model.ssm.d_state=32` for
  s4d/s4, `--model.mamba.d_state=8`, `--model.mamba2.headdim=16`, `--model.attention.n_heads=2`).
- `optim`, `train`: the LRA trainer's sections (`experiments.lra.config.OptimConfig` and
  `TrainConfig`), with defaults of the synthetic presets.

Every model is causal (`bidirectional=False`) and reads per-position logits (pooling "none");
the Transformer uses RoPE. Values are parsed and checked by the LRA override parser and checks;
`validate` refuses a bad config before any data or model is built. The runner:
`experiments.synthetic.run`; the tasks: `docs/synthetic.md`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from experiments.lra.config import OptimConfig, TrainConfig
from experiments.lra.config import check_optim, check_train, Checks  # the LRA checks of these sections
from experiments.lra.overrides import field_type, parse_value
from experiments.lra.packing import pack_errors
from experiments.synthetic.data import TASKS
from ssm.config import AttentionConfig, Mamba2Config, MambaConfig, S4Config

PRESETS = ("default", "smoke")


def _mamba3_config():
    """The Mamba-3 config class when this version of `ssm` has the layer, else None."""
    try:
        from ssm.models import LAYERS
    except ImportError:
        return None
    entry = LAYERS.get("mamba3")
    return None if entry is None else entry[1]


MAMBA3 = _mamba3_config()
MODELS = ("s4d", "s4", "transformer", "mamba", "mamba2") + (("mamba3",) if MAMBA3 is not None else ())
# Model name -> the field of ModelConfig holding its layer config.
LAYER_FIELD = {"s4d": "ssm", "s4": "ssm", "transformer": "attention", "mamba": "mamba", "mamba2": "mamba2",
               "mamba3": "mamba3"}


@dataclass
class DataConfig:
    batch_size: int = 32
    eval_batch_size: int | None = None  # None: same as batch_size
    n_train: int = 19200  # training samples per epoch (drawn once; reshuffled each epoch)
    n_val: int = 256
    n_test: int = 512
    # Test again at these multiples of task.seq_len (comma separated; "1": the training length only).
    eval_lengths: str = "1"
    num_workers: int = 0
    pack: bool = False  # train on packed rows of whole samples with seq_idx (`experiments.lra.packing`)
    pack_len: int | None = None  # tokens per packed row; None: task.seq_len (one sample a row)


@dataclass
class ModelConfig:
    d_model: int = 32
    n_layers: int = 2
    ssm: S4Config = field(default_factory=lambda: S4Config(d_state=16))
    attention: AttentionConfig = field(default_factory=lambda: AttentionConfig(n_heads=2))
    mamba: MambaConfig = field(default_factory=lambda: MambaConfig(d_state=16))
    mamba2: Mamba2Config = field(default_factory=lambda: Mamba2Config(d_state=16, headdim=16, chunk_size=64))
    mamba3: object = field(default_factory=lambda: _small(MAMBA3))


def _small(cls):
    """A Mamba-3 config sized like the Mamba-2 one (d_state 16, heads of 16 channels); None without it."""
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (("d_state", 16), ("headdim", 16)) if k in names})


@dataclass
class Config:
    task: str = "mqar"
    model_name: str = "s4d"
    preset: str = "default"
    task_config: object = None  # the task's frozen config; None: the preset's
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, ssm_lr=1e-3, dt_lr=1e-3,
                                                                   weight_decay=0.0, warmup_frac=0.05))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, log_every=20, eval_every=200,
                                                                   amp=False, threads=None))

    def to_dict(self) -> dict:
        out = {"task": self.task, "model_name": self.model_name, "preset": self.preset,
               "task_config": dataclasses.asdict(self.task_config)}
        for name in ("data", "optim", "train"):
            out[name] = dataclasses.asdict(getattr(self, name))
        m = self.model
        out["model"] = {"d_model": m.d_model, "n_layers": m.n_layers,
                        "layer": dataclasses.asdict(layer_config(self))}  # only the family's own config
        return out


SECTIONS = {"task": None, "data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig}
# Fields the runner sets itself.
FIXED = {"model.ssm.mode": "the model name (s4: dplr, s4d: diag)",
         "model.ssm.bidirectional": "the runner (synthetic models are causal)",
         "model.attention.bidirectional": "the runner (synthetic models are causal)",
         "model.attention.pos": "the runner (the Transformer uses RoPE)"}

# Per task: the preset's task config and how many training samples / steps it takes.
_DEFAULT_TASKS = {
    "mqar": dict(vocab_size=32, num_kv_pairs=4, seq_len=32),
    "selective_copy": dict(vocab_size=8, n_tokens=4, seq_len=32),
    "induction": dict(vocab_size=8, seq_len=32),
    "parity": dict(seq_len=32),
    "modadd": dict(modulus=3, seq_len=32),
    "s5": dict(seq_len=16),
}
_SMOKE_TASKS = {
    "mqar": dict(vocab_size=16, num_kv_pairs=2, seq_len=16),
    "selective_copy": dict(vocab_size=5, n_tokens=2, seq_len=16),
    "induction": dict(vocab_size=5, seq_len=16),
    "parity": dict(seq_len=16),
    "modadd": dict(modulus=3, seq_len=16),
    "s5": dict(seq_len=8),
}


def preset_config(task: str, model: str, preset: str = "default") -> Config:
    """The preset's config of `task` with `model`; ValueError naming the allowed names otherwise."""
    for name, value, allowed in (("task", task, tuple(TASKS)), ("model", model, MODELS), ("preset", preset, PRESETS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    knobs = (_DEFAULT_TASKS if preset == "default" else _SMOKE_TASKS)[task]
    cfg = Config(task=task, model_name=model, preset=preset, task_config=TASKS[task].config(**knobs))
    if preset == "smoke":
        cfg.data = DataConfig(batch_size=8, n_train=64, n_val=16, n_test=16)
        cfg.model.d_model = 16
        cfg.model.ssm.d_state = cfg.model.mamba.d_state = cfg.model.mamba2.d_state = 4
        cfg.model.mamba2.headdim = 8
        if cfg.model.mamba3 is not None:
            cfg.model.mamba3 = dataclasses.replace(cfg.model.mamba3, d_state=4, headdim=8)
        cfg.train.log_every = 1
        cfg.train.eval_every = None
        cfg.train.progress = False
    if task == "induction" and preset == "default":
        cfg.data.eval_lengths = "1,2,4,8,16"
        cfg.data.n_test = 256
    return cfg


def layer_config(cfg: Config):
    """The layer config of the run's model family, with the fields the runner fixes."""
    m = cfg.model
    layer = getattr(m, LAYER_FIELD[cfg.model_name])
    if cfg.model_name in ("s4d", "s4"):
        return dataclasses.replace(layer, mode="dplr" if cfg.model_name == "s4" else "diag", bidirectional=False)
    if cfg.model_name == "transformer":
        return dataclasses.replace(layer, bidirectional=False, pos="rope")
    return layer


def eval_factors(cfg: Config) -> tuple[int, ...]:
    """The test-length multiples of `data.eval_lengths` (ValueError naming the field when malformed)."""
    text = cfg.data.eval_lengths
    try:
        factors = tuple(int(t) for t in str(text).split(","))
    except ValueError:
        factors = ()
    if not factors or any(f < 1 for f in factors) or len(set(factors)) != len(factors):
        raise ValueError(f"--data.eval_lengths must be distinct integers >= 1 separated by commas, got {text!r}")
    return factors


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
    """Set `section.field` keys (values as strings) on `cfg`, typed by the field; then `validate`."""
    for key, text in overrides.items():
        section, *path = key.split(".")
        if section not in SECTIONS or not path or not all(path):
            raise ValueError(f"unknown config key --{key}: use --section.field with section one of {tuple(SECTIONS)}")
        if key in FIXED:
            raise ValueError(f"--{key} is set by {FIXED[key]}; it cannot be overridden")
        if section == "task":
            _set_task_knob(cfg, key, path, text)
            continue
        if section == "model" and path[0] == "mamba3" and MAMBA3 is None:
            raise ValueError(f"--{key}: this version of ssm has no Mamba-3 layer")
        tp = field_type(SECTIONS[section], key, path) if path[0] != "mamba3" else field_type(MAMBA3, key, path[1:])
        obj = getattr(cfg, section)
        for name in path[:-1]:
            obj = getattr(obj, name)
        setattr(obj, path[-1], parse_value(key, text, tp))
    return validate(cfg)


def _set_task_knob(cfg: Config, key: str, path: list[str], text: str) -> None:
    cls = type(cfg.task_config)
    names = [f.name for f in dataclasses.fields(cls)]
    if len(path) != 1 or path[0] not in names:
        raise ValueError(f"unknown field --{key}; knobs of task {cfg.task!r}: {', '.join(names)}")
    value = parse_value(key, text, typing.get_type_hints(cls)[path[0]])
    cfg.task_config = dataclasses.replace(cfg.task_config, **{path[0]: value})  # the task checks the knob


def validate(cfg: Config) -> Config:
    """Check every value; ValueError naming each bad field as on the command line. Builds nothing."""
    errors = []
    if not isinstance(cfg.task_config, TASKS[cfg.task].config):
        errors.append(f"task_config must be a {TASKS[cfg.task].config.__name__} for task {cfg.task!r}")
    c = Checks(cfg)
    for key in ("data.batch_size", "data.n_train", "data.n_val", "data.n_test", "model.d_model", "model.n_layers"):
        c.integer(key, 1)
    c.integer("data.eval_batch_size", 1, none_ok=True)
    c.integer("data.num_workers", 0)
    check_optim(c)
    check_train(c)
    errors += c.errors
    errors += pack_errors(cfg.data.pack, cfg.data.pack_len, getattr(cfg.task_config, "seq_len", 1))
    try:
        eval_factors(cfg)
    except ValueError as e:
        errors.append(str(e))
    if not errors:
        errors += _check_layer(cfg)
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors) if len(errors) > 1 else errors[0])
    return cfg


def _check_layer(cfg: Config) -> list[str]:
    """Checks of the layer settings that need no model (the layers check the rest when built,
    which `experiments.synthetic.run` does before it creates the run folder)."""
    if cfg.model_name in ("mamba2", "mamba3") and hasattr(getattr(cfg.model, cfg.model_name), "headdim"):
        lc = getattr(cfg.model, cfg.model_name)
        d_ssm = getattr(lc, "d_ssm", None) or lc.expand * cfg.model.d_model
        if not isinstance(lc.headdim, int) or lc.headdim < 1 or d_ssm % lc.headdim:
            return [f"--model.{cfg.model_name}.headdim={lc.headdim!r} must divide the SSM width {d_ssm} "
                    f"(expand * d_model = {lc.expand} * {cfg.model.d_model})"]
    if cfg.model_name == "transformer":
        a = cfg.model.attention
        if not isinstance(a.n_heads, int) or a.n_heads < 1 or cfg.model.d_model % a.n_heads \
                or (cfg.model.d_model // a.n_heads) % 2:
            return [f"--model.attention.n_heads={a.n_heads!r} must divide --model.d_model={cfg.model.d_model} "
                    "into heads of even size (RoPE rotates pairs)"]
    return []
