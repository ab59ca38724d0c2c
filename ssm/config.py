"""Typed settings of the layer kinds: one dataclass per kind, the only place its defaults live.

A layer keeps the keyword constructor of PyTorch habit (`ssm.S4(256, d_state=64, mode="diag")`);
its keywords and their defaults are the fields of its config class (`S4Config` for `ssm.S4`,
`AttentionConfig` for attention), and `ssm.S4(256, config=S4Config(...))` takes a whole config.
Residual blocks (`BlockConfig`), `ssm.SequenceModel` and the LRA configuration nest these
classes instead of repeating their fields. Learning rates are not layer settings: parameters are
tagged by kind and `ssm.param_groups(model, lr, weight_decay, ssm_lr=, dt_lr=)` maps kinds to rates.

`build(cls, config, options, owner)` merges a config and keyword options, checks every name (an
unknown one raises `TypeError` naming it and the close matches; a retired one names its new
spelling) and returns a new config object; the layer then validates the values.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass

# Keywords that used to be layer arguments: where each one went.
RETIRED = {
    "ssm_lr": "learning rates are chosen when the optimizer is built: "
              "ssm.param_groups(model, lr, weight_decay, ssm_lr=..., dt_lr=...)",
    "dt_lr": "learning rates are chosen when the optimizer is built: "
             "ssm.param_groups(model, lr, weight_decay, ssm_lr=..., dt_lr=...)",
    "causal": "use bidirectional=False (causal, the default of every block kind) or bidirectional=True",
}


@dataclass
class S4Config:
    """Settings of `ssm.S4` (docs/s4.md, "Layer options").

    mode: "diag" (S4D, `ssm.layers.ssm_diag.DiagSSM`) or "dplr" (S4, `ssm.layers.ssm_dplr.DPLRSSM`).
    init: the HiPPO measure or diagonal init (which one works with which mode: docs/s4.md).
    rank: DPLR low-rank size (None: the measure's own rank); only with mode="dplr".
    channels: independent SSM output copies per feature, mixed by the output projection.
    n_ssm: None (one SSM per channel) or the number of (A, B, P) copies shared by the channels.
    dt_transform: "exp" or "softplus" map from the parameter `log_dt` to dt.
    discretization: None (the mode's default: "zoh" for diag, "bilinear" for dplr) or a name.
    b_clip: clip the imaginary part of the NPLR eigenbasis B to [-b_clip, b_clip] at init
        (the public S4 code does, with 2.0); None keeps the exact eigenbasis B.
    l_max: mode="dplr" only: the length the learned Ct belongs to (None: set by the first
        forward, or by whoever knows the data's maximum length via `layer.l_max = ...`).
    check_finite: refuse NaN/Inf inputs with the position named (False skips the check).
    """

    d_state: int = 64
    mode: str = "diag"
    init: str = "legs"
    rank: int | None = None
    bidirectional: bool = False
    channels: int = 1
    n_ssm: int | None = None
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_transform: str = "exp"
    discretization: str | None = None
    b_clip: float | None = 2.0
    activation: str = "gelu"
    dropout: float = 0.0
    tie_dropout: bool = False
    l_max: int | None = None
    backend: str = "auto"
    check_finite: bool = True


@dataclass
class AttentionConfig:
    """Settings of the attention block (`ssm.layers.attention`; positions: docs/rope.md).

    bidirectional: False masks the future (causal), as every block kind does by default (the
        older keyword `causal=` is still accepted by the attention modules).
    d_mlp: the Transformer block's MLP width (None: 4 * d_model); unused by the attention itself.
    """

    n_heads: int = 8
    d_mlp: int | None = None
    bidirectional: bool = False
    dropout: float = 0.0
    pos: str = "none"
    rope_scaling: dict | None = None
    rope_base: float = 10000.0
    rope_interleaved: bool = False
    rotary_fraction: float = 1.0
    grid_width: int | None = None
    log_n_scaling: bool = False
    max_len: int | None = None
    impl: str = "auto"
    bias: bool = True


@dataclass
class BlockConfig:
    """The residual block around a layer: normalisation placement and kind, optional feed-forward.

    The block's own dropouts use the layer config's `dropout` (and `tie_dropout` for S4).
    """

    prenorm: bool = True
    norm: str = "layer"
    d_ff: int | None = None


def fields_of(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def build(cls, config, options: dict, owner: str):
    """A new `cls` from `config` (None, a `cls`, or a dict) with `options` applied on top."""
    names = fields_of(cls)
    if config is None:
        base = {}
    elif isinstance(config, cls):
        base = dataclasses.asdict(config)
    elif isinstance(config, dict):
        base = dict(config)
    else:
        raise TypeError(f"{owner}: config must be a {cls.__name__} (or a dict of its fields), "
                        f"got {type(config).__name__}")
    merged = {**base, **options}
    for key in merged:
        if key in names:
            continue
        if key in RETIRED:
            raise TypeError(f"{owner}: {key!r} is no longer a layer argument; {RETIRED[key]}")
        close = difflib.get_close_matches(key, names, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise TypeError(f"{owner} got an unexpected keyword argument {key!r}{hint} "
                        f"(its settings are the fields of {cls.__name__}: {', '.join(names)})")
    return cls(**merged)


def split_options(options: dict, layer_cls, block_cls=BlockConfig) -> tuple[dict, dict]:
    """Keyword options of a residual block -> (layer options, block options), by field name.

    Names of neither class stay with the layer options, where `build` reports them.
    """
    block_names = fields_of(block_cls)
    return ({k: v for k, v in options.items() if k not in block_names},
            {k: v for k, v in options.items() if k in block_names})


def keyword_signature(func, cls, *, after: str) -> inspect.Signature:
    """`func`'s signature with `cls`'s fields as keyword-only parameters inserted after `after`.

    Used for the `__signature__` of layer constructors, so `help(ssm.S4)` and IDEs show every
    setting with its default although the defaults are written only in the dataclass.
    """
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                               default=f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                               annotation=f.type)
             for f in dataclasses.fields(cls) if f.name not in taken]
    at = [p.name for p in params].index(after) + 1
    return sig.replace(parameters=params[:at] + extra + params[at:])


__all__ = ["S4Config", "AttentionConfig", "BlockConfig", "build", "fields_of", "keyword_signature", "split_options"]


@dataclass
class MambaConfig:
    """Settings of `ssm.Mamba` (docs/selective.md, "Block structure"); names as the public Mamba module.

    d_inner = expand * d_model channels, each with a real diagonal state of size d_state.
    dt_rank: width of the low-rank dt projection ("auto": ceil(d_model / 16)).
    dt_init: "random" (dt_proj.weight ~ U(-s, s)) or "constant" (= s), s = dt_scale / sqrt(dt_rank);
        dt_proj.bias is the inverse softplus of a log-uniform dt in [dt_min, dt_max], floored at
        dt_init_floor.
    bias: biases of in_proj and out_proj; conv_bias: bias of the depthwise convolution.
    backend: the scan's backend ("auto", "torch", "triton"); check_finite as in `S4Config`.
    """

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init: str = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    backend: str = "auto"
    check_finite: bool = True


@dataclass
class Mamba2Config:
    """Settings of `ssm.Mamba2` (docs/selective.md); names and defaults as the public Mamba-2 module.

    d_ssm: channels that go through the SSM (None: all d_inner = expand * d_model); the other
        d_inner - d_ssm form a gated MLP branch silu(z0) * x0 beside it.
    headdim: channels per head (d_ssm = nheads * headdim); ngroups: groups sharing B and C.
    A_init_range: A = -U(A_init_range) per head. D_has_hdim: one skip per channel, not per head.
    rmsnorm: the gated RMSNorm on the output (norm(y * silu(z)), or norm(y) * silu(z) with
        norm_before_gate), in ngroups groups; without it the output is y * silu(z).
    dt_limit: (lo, hi) clamp of dt after the softplus. conv_init: None (PyTorch's default init
        of the convolution) or c for U(-c, c). norm_eps: epsilon of the gated RMSNorm.
    """

    d_state: int = 128
    d_conv: int = 4
    conv_init: float | None = None
    expand: int = 2
    headdim: int = 64
    d_ssm: int | None = None
    ngroups: int = 1
    A_init_range: tuple = (1.0, 16.0)
    D_has_hdim: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_limit: tuple = (0.0, float("inf"))
    bias: bool = False
    conv_bias: bool = True
    chunk_size: int = 256
    norm_eps: float = 1e-5
    backend: str = "auto"
    check_finite: bool = True


__all__ += ["MambaConfig", "Mamba2Config"]


@dataclass
class Mamba3Config:
    """Settings of `ssm.Mamba3` (docs/mamba3.md); names and defaults as the public Mamba-3 module.

    headdim: channels per head (expand * d_model = nheads * headdim); ngroups: groups sharing B, C.
    rope_fraction: 0.5 or 1.0, the share of the d_state dimensions that rotate (in pairs).
    A_floor: the data-dependent A is clamped to <= -A_floor. dt_min, dt_max, dt_init_floor: the
        log-uniform init of dt_bias, as in `Mamba2Config`.
    is_mimo, mimo_rank: the rank-r (MIMO) state update; SISO (rank 1) when is_mimo is False.
    is_outproj_norm: a gated RMSNorm per head, norm(y) * silu(z), instead of the gate y * silu(z).
    fuse_pregate_headwise_norm: accepted for the public signature; a kernel-fusion switch of the
        public module with no effect on the result.
    chunk_size: tokens per chunk of the chunked scan (the result does not depend on it).
    """

    d_state: int = 128
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    rope_fraction: float = 0.5
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_floor: float = 1e-4
    is_outproj_norm: bool = False
    is_mimo: bool = False
    mimo_rank: int = 4
    fuse_pregate_headwise_norm: bool = True
    chunk_size: int = 64
    backend: str = "auto"
    check_finite: bool = True


__all__ += ["Mamba3Config"]
