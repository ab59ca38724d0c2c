"""Command-line overrides of an LRA config: `--section.field=value` (or `--section.field value`);
nested layer and block settings as `--model.ssm.d_state=64`, `--model.block.norm=batch`.

The value is parsed by the field's type (bool, int, float, str, `X | None`), checked against the
field's allowed names (`config.CHOICES`), and the whole config is validated afterwards
(`config.validate`). An unknown section or field is a ValueError listing what exists; a key of an
earlier flat layout (`--model.d_state`) is a ValueError naming its new key; a field the model sets
itself (`config.DERIVED`) cannot be overridden.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from experiments.lra.config import CHOICES, DERIVED, MOVED, SECTIONS, Config, derive, get_field, validate


def field_type(section_cls, key: str, path: list[str]):
    """The type of the field at `path` inside `section_cls`, following nested dataclasses; ValueError
    naming the fields that exist when there is no such field."""
    cls = section_cls
    for depth, name in enumerate(path):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if name not in names:
            where = ".".join([key.split(".")[0]] + path[:depth])
            raise ValueError(f"unknown field --{key}; fields of [{where}]: {', '.join(names)}")
        tp = hints[name]
        if depth < len(path) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ValueError(f"unknown field --{key}: {'.'.join(path[:depth + 1])} has no fields")
            cls = tp
        elif dataclasses.is_dataclass(tp):
            sub = ", ".join(f.name for f in dataclasses.fields(tp))
            raise ValueError(f"--{key} is a group of fields; set one of them: --{key}.<{sub}>")
    return tp


def parse_value(key: str, text: str, tp):
    """Parse `text` as type `tp`: bool, int, float, str, `X | None`, `int | str` (an int when it
    reads as one, e.g. `dt_rank=8` or `dt_rank=auto`) or a tuple of numbers (`1,16` or `(1, 16)`)."""
    args = typing.get_args(tp)
    if type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        args = typing.get_args(tp)
    if set(args) == {int, str}:
        return parse_value(key, text, int) if text.lstrip("+-").isdigit() else text
    if tp is tuple or typing.get_origin(tp) is tuple:
        parts = [p.strip() for p in text.strip().strip("()[]").split(",") if p.strip()]
        if not parts:
            raise ValueError(f"--{key}: expected comma-separated numbers such as 1,16, got {text!r}")
        return tuple(parse_value(key, p, float) for p in parts)
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
    """Set `section.field` / `section.group.field` keys (values as strings) on `cfg` in place,
    type-checked, then `derive` and `validate`."""
    for key, text in overrides.items():
        section, *path = key.split(".")
        if section not in SECTIONS or not path or not all(path):
            raise ValueError(f"unknown config key --{key}: use --section.field with section one of {tuple(SECTIONS)}")
        if key in MOVED:
            raise ValueError(f"--{key} has moved: use --{MOVED[key]}")
        if key in DERIVED:
            raise ValueError(f"--{key} is set by the model from {DERIVED[key]}; it cannot be overridden")
        value = parse_value(key, text, field_type(SECTIONS[section], key, path))
        allowed = CHOICES.get(key)
        if allowed is not None and value not in allowed:
            raise ValueError(f"--{key} must be one of {allowed}, got {value!r}")
        setattr(get_field(cfg, ".".join([section] + path[:-1])), path[-1], value)
    validate(derive(cfg))
    return cfg


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


def _lines(prefix: str, values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += _lines(f"{prefix}.{key}", value) if isinstance(value, dict) else [f"{prefix}.{key} = {value}"]
    return out


def format_config(cfg: Config) -> str:
    """One `section.field = value` line per field (nested: `model.ssm.d_state = 64`), for logs and --help."""
    lines = [f"task = {cfg.task}", f"model = {cfg.model_name}", f"preset = {cfg.preset}"]
    for section in SECTIONS:
        lines += _lines(section, dataclasses.asdict(getattr(cfg, section)))
    return "\n".join(lines)


def parse_cli(parser, argv: list[str] | None, make_config, out_root: str):
    """Command line -> (args, config) for a training entry point: `--section.field=value` overrides
    are split off, the rest parsed by `parser`, the config built by `make_config(args, overrides)`
    (which validates it); a bad value exits through `parser.error` (status 2, with the usage line).
    The default run folder is `runs/<out_root>/<task>-<model>-<preset>`."""
    try:
        rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    try:
        cfg = make_config(args, overrides)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.out is None:
        args.out = Path("runs") / out_root / f"{args.task}-{args.model}-{args.preset}"
    return args, cfg
