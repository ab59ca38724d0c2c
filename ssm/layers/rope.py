"""Rotary position embeddings (RoPE) and the context-extension variants.

The math: docs/rope.md#rotary-position-embedding and docs/rope.md#scalings.

What lives here:
- `rope_frequencies`: inverse frequencies `theta_i` (and the cos/sin scale) for plain RoPE and the
  scaled variants "linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "ntk_mixed", plus
  "rerope" / "leaky_rerope" (frequencies unchanged; the attention scores change, see `rerope_scores`).
  Parameter names follow the `transformers` library; where both libraries have a type the numbers
  agree with `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`.
- `rope_angles`, `axial_angles`, `apply_rotary`: rotating q/k, both layouts, partial rotary.
- `rerope_scores`: explicit attention logits with the relative distance clipped (ReRoPE) or
  compressed (leaky ReRoPE) beyond a window.
- `log_n_scale`, `rope_base_bound`.

YaRN's ramp follows `transformers`: linear in the pair index between the pairs where `r_i` equals
`beta_fast` and `beta_slow`, rounded outward when `truncate` (not linear in `r_i` itself), so that
the frequencies match the reference implementation (docs/rope.md#scalings, "YaRN ramp").
Frequencies are computed in float64; cos/sin are cast to the input dtype at the end.
"""
from __future__ import annotations

import math

import numpy as np
import torch

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "ntk_mixed", "rerope", "leaky_rerope")

# Allowed keys per type (besides "type"); None marks a required key.
_KEYS = {
    "linear": {"factor": None},
    "ntk": {"factor": None},
    "dynamic": {"factor": None, "original_max_position_embeddings": None},
    "yarn": {"factor": None, "original_max_position_embeddings": None, "beta_fast": 32.0, "beta_slow": 1.0,
             "attention_factor": None, "mscale": None, "mscale_all_dim": None, "truncate": True},
    "llama3": {"factor": 8.0, "original_max_position_embeddings": None, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0},
    "longrope": {"factor": None, "original_max_position_embeddings": None, "short_factor": None,
                 "long_factor": None, "attention_factor": None},
    "ntk_mixed": {"factor": None, "exponent": 0.75},
    "rerope": {"window": None},
    "leaky_rerope": {"window": None, "factor": None},
}
# Keys that may stay None (optional without a default value).
_OPTIONAL_NONE = {("yarn", "attention_factor"), ("yarn", "mscale"), ("yarn", "mscale_all_dim"),
                  ("longrope", "attention_factor"), ("longrope", "factor")}


def parse_scaling(scaling: dict | None) -> dict | None:
    """Validate a scaling dict and fill defaults; returns a new dict (or None)."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict) or "type" not in scaling:
        raise ValueError(f"scaling must be None or a dict with a 'type' key, got {scaling!r}")
    kind = scaling["type"]
    if kind not in _KEYS:
        raise ValueError(f"unknown RoPE scaling type {kind!r}; allowed: {ROPE_TYPES}")
    unknown = set(scaling) - set(_KEYS[kind]) - {"type"}
    if unknown:
        raise ValueError(f"RoPE scaling {kind!r} got unknown keys {sorted(unknown)}; "
                         f"allowed: {sorted(_KEYS[kind])}")
    out = {"type": kind}
    for key, default in _KEYS[kind].items():
        value = scaling.get(key, default)
        if value is None and (kind, key) not in _OPTIONAL_NONE:
            raise ValueError(f"RoPE scaling {kind!r} needs {key!r}")
        out[key] = value
    factor = out.get("factor")
    if factor is not None and not factor > 0:
        raise ValueError(f"RoPE scaling factor must be > 0, got {factor}")
    if kind in ("rerope", "leaky_rerope") and not out["window"] >= 1:
        raise ValueError(f"RoPE scaling window must be >= 1, got {out['window']}")
    return out


def _plain_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)


def rope_frequencies(head_dim: int, *, base: float = 10000.0, scaling: dict | None = None,
                     seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `theta_i` (float64, (head_dim // 2,)) and the cos/sin scale.

    `head_dim` is the rotated dimension (for partial rotary pass the rotated part). `seq_len` is the
    current length, used by "dynamic" and "longrope" only. The scale multiplies cos and sin (so the
    logits are scaled by its square), as in `transformers`.
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2, got {head_dim}")
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base}")
    cfg = parse_scaling(scaling)
    kind = None if cfg is None else cfg["type"]
    d = head_dim
    inv_freq = _plain_inv_freq(d, base)  # (d/2,)
    if kind in (None, "rerope", "leaky_rerope"):
        return inv_freq, 1.0
    s = float(cfg["factor"]) if cfg.get("factor") is not None else None
    if kind == "linear":
        return inv_freq / s, 1.0
    if kind == "ntk":
        if d == 2:
            raise ValueError("NTK scaling needs head_dim > 2")
        return _plain_inv_freq(d, base * s ** (d / (d - 2))), 1.0
    if kind == "dynamic":
        if d == 2:
            raise ValueError("dynamic NTK scaling needs head_dim > 2")
        l_train = cfg["original_max_position_embeddings"]
        length = l_train if seq_len is None else max(int(seq_len), l_train)
        new_base = base * (s * length / l_train - (s - 1)) ** (d / (d - 2))
        return _plain_inv_freq(d, new_base), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, cfg, d, base)
    if kind == "llama3":
        l_train = cfg["original_max_position_embeddings"]
        lo, hi = cfg["low_freq_factor"], cfg["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq  # (d/2,)
        smooth = (l_train / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / s + smooth * inv_freq
        out = torch.where(wavelen > l_train / lo, inv_freq / s, blended)
        return torch.where(wavelen < l_train / hi, inv_freq, out), 1.0
    if kind == "longrope":
        return _longrope(inv_freq, cfg, d, seq_len)
    if kind == "ntk_mixed":
        j = torch.arange(d // 2, dtype=torch.float64)
        a = math.log(s) / (d / 2) ** cfg["exponent"]
        return inv_freq * torch.exp(-a * j ** cfg["exponent"]), 1.0
    raise AssertionError(kind)


def _yarn(inv_freq: torch.Tensor, cfg: dict, d: int, base: float) -> tuple[torch.Tensor, float]:
    s, l_train = float(cfg["factor"]), cfg["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = cfg["attention_factor"]
    if att is None:
        if cfg["mscale"] and cfg["mscale_all_dim"]:
            att = mscale(s, cfg["mscale"]) / mscale(s, cfg["mscale_all_dim"])
        else:
            att = mscale(s)

    def pair_with_rotations(n_rot: float) -> float:
        # the (fractional) pair index whose r_i = L_train * theta_i / (2 pi) equals n_rot
        return d * math.log(l_train / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_with_rotations(cfg["beta_fast"]), pair_with_rotations(cfg["beta_slow"])
    if cfg["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # same guard as the reference against a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # (d/2,)
    keep = 1 - ramp  # 1: keep theta (fast pairs), 0: interpolate theta/s (slow pairs)
    return inv_freq / s * (1 - keep) + inv_freq * keep, float(att)


def _longrope(inv_freq: torch.Tensor, cfg: dict, d: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    l_train = cfg["original_max_position_embeddings"]
    s = cfg["factor"]
    if s is None:
        raise ValueError("RoPE scaling 'longrope' needs 'factor' (target length / original length)")
    att = cfg["attention_factor"]
    if att is None:
        att = 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(l_train))
    ext = cfg["long_factor"] if seq_len is not None and seq_len > l_train else cfg["short_factor"]
    ext = torch.as_tensor(ext, dtype=torch.float64)
    if ext.shape != (d // 2,):
        raise ValueError(f"longrope short_factor/long_factor must have head_dim // 2 = {d // 2} entries, "
                         f"got {tuple(ext.shape)}")
    return inv_freq / ext, float(att)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles `m * theta_i` in float64: positions (...,) -> (..., len(inv_freq))."""
    return positions.to(torch.float64)[..., None] * inv_freq.to(positions.device, torch.float64)


def axial_angles(positions: torch.Tensor, inv_freq: torch.Tensor, width: int) -> torch.Tensor:
    """2D axial RoPE angles for a row-major grid of `width` columns: the first half of the pairs
    rotate by the row `m // width`, the second half by the column `m % width`.

    `inv_freq` holds the per-axis frequencies (length = pairs / 2): (...,) -> (..., 2 * len(inv_freq)).
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    rows = torch.div(positions, width, rounding_mode="floor")
    return torch.cat([rope_angles(rows, inv_freq), rope_angles(positions % width, inv_freq)], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first `2 * cos.shape[-1]` features of `x` (..., L, D); the rest pass through.

    Half-split layout pairs feature `i` with `i + R/2` (R = rotated dims); interleaved pairs `2i`
    with `2i + 1`. `cos`/`sin` (..., L, R/2) broadcast against x's leading dims.
    """
    r = 2 * cos.shape[-1]
    if r > x.shape[-1]:
        raise ValueError(f"rotary dims {r} exceed head dim {x.shape[-1]}")
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    xr, rest = x[..., :r], x[..., r:]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]  # (..., L, R/2)
        rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)  # (..., L, R)
    else:
        a, b = xr[..., : r // 2], xr[..., r // 2:]
        rot = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)  # (..., L, R)
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


def interleaved_to_half(x: torch.Tensor, rotary_dim: int | None = None) -> torch.Tensor:
    """The fixed permutation taking the interleaved layout to the half-split one (last dim)."""
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    return torch.cat([x[..., 0:r:2], x[..., 1:r:2], x[..., r:]], dim=-1)


def log_n_scale(n: torch.Tensor, train_len: int) -> torch.Tensor:
    """Logit scale `max(1, ln n / ln L_train)` for `n` visible keys (float64)."""
    if train_len < 2:
        raise ValueError(f"train_len must be >= 2 for log-n scaling, got {train_len}")
    return (torch.log(n.to(torch.float64).clamp_min(1)) / math.log(train_len)).clamp_min(1.0)


def rerope_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                  inv_freq: torch.Tensor, *, window: int, leak: float | None = None,
                  interleaved: bool = False, cos_scale: float = 1.0) -> torch.Tensor:
    """Unscaled logits `q . k` with ReRoPE relative positions.

    Relative distance `t = m - n` is used as is while `|t| < window`; beyond it ReRoPE uses
    `sign(t) * window` and leaky ReRoPE `sign(t) * (window + (|t| - window) / leak)`. Each branch is
    an ordinary RoPE product with shifted/rescaled positions, so three score matrices are formed
    (exact, far-after, far-before) and selected elementwise.
    q (..., Lq, D), k (..., Lk, D), q_pos (..., Lq), k_pos (..., Lk) broadcastable -> (..., Lq, Lk).
    """
    k_lin = 0.0 if leak is None else 1.0 / leak

    def scores(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        qa, ka = rope_angles(qp, inv_freq), rope_angles(kp, inv_freq)  # (..., Lq, P), (..., Lk, P)
        qr = apply_rotary(q, cos_scale * qa.cos(), cos_scale * qa.sin(), interleaved=interleaved)
        kr = apply_rotary(k, cos_scale * ka.cos(), cos_scale * ka.sin(), interleaved=interleaved)
        return qr @ kr.transpose(-1, -2)  # (..., Lq, Lk)

    qp, kp = q_pos.to(torch.float64), k_pos.to(torch.float64)
    exact = scores(qp, kp)
    # t = m - n > 0 far away: t' = window + (t - window) * k_lin = (m * k_lin + window (1 - k_lin)) - n * k_lin
    after = scores(qp * k_lin + window * (1 - k_lin), kp * k_lin)
    before = scores(qp * k_lin - window * (1 - k_lin), kp * k_lin)
    t = qp[..., :, None] - kp[..., None, :]  # (..., Lq, Lk)
    return torch.where(t >= window, after, torch.where(t <= -window, before, exact))


def base_bound_margin(head_dim: int, L: int, bases: np.ndarray) -> np.ndarray:
    """`min_{0 <= m <= L} sum_i cos(m theta_i(base))` for each base in `bases` (float64)."""
    bases = np.asarray(bases, dtype=np.float64)
    i = np.arange(head_dim // 2, dtype=np.float64)
    m = np.arange(L + 1, dtype=np.float64)
    out = np.empty(bases.shape)
    for j, b in enumerate(bases.ravel()):
        theta = b ** (-2 * i / head_dim)  # (d/2,)
        out.ravel()[j] = np.cos(np.outer(m, theta)).sum(axis=1).min()
    return out


def rope_base_bound(head_dim: int, L: int, *, points_per_decade: int = 200, rtol: float = 1e-6,
                    max_base: float = 1e12) -> float:
    """Smallest base with `sum_i cos(m theta_i) >= 0` for every `0 <= m <= L` (numerically).

    The margin is not monotone in the base, so the search scans a geometric grid upwards from 1 and
    bisects the first failing -> passing bracket to `rtol`. A valid stretch narrower than the grid
    step can be missed; `points_per_decade` controls that.
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2, got {head_dim}")
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    n = int(math.ceil(math.log10(max_base) * points_per_decade))
    grid = np.logspace(0, math.log10(max_base), n + 1)[1:]
    chunk = 64
    prev = 1.0
    for start in range(0, len(grid), chunk):
        block = grid[start:start + chunk]
        ok = base_bound_margin(head_dim, L, block) >= 0
        if ok.any():
            j = int(np.argmax(ok))
            lo, hi = (block[j - 1] if j else prev), block[j]
            while hi - lo > rtol * hi:
                mid = math.sqrt(lo * hi)
                if base_bound_margin(head_dim, L, np.array([mid]))[0] >= 0:
                    hi = mid
                else:
                    lo = mid
            return float(hi)
        prev = block[-1]
    raise ValueError(f"no base <= {max_base:g} satisfies the bound for head_dim={head_dim}, L={L}")
