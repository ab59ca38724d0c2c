"""Multi-head attention and the pre-norm Transformer block: the attention baseline.

The math: docs/rope.md#the-attention-module-and-its-kv-cache (module contract, KV cache) and
docs/rope.md#alibi.

What lives here:
- `alibi_slopes(n_heads)`: the ALiBi head slopes.
- `MultiHeadAttention`: attention through `F.scaled_dot_product_attention` (causal or
  bidirectional, key padding from `lengths`), an explicit-score path (needed by ReRoPE), positions
  none / RoPE (any scaling from `rope.py`, both layouts, partial rotary, 2D axial) / ALiBi, log-n
  logit scaling, and a KV cache so a causal layer follows the SSM layers' contract
  `forward(x, state=None, lengths=None) -> (y, next_state)`, `default_state`, `step`.
- `StaticKVCache`: a preallocated KV cache written in place (the fast decoding path).
- `TransformerBlock`: residual block (pre-norm by default) of attention + GELU MLP.

Two KV caches. The dynamic one (`default_state(batch)`, a dict) stores keys *before* rotation
together with their positions and a validity mask and grows by concatenation, so right-padded
batches can keep decoding (each row continues at its own length) and variants whose frequencies
depend on the current length ("dynamic", "longrope") can re-rotate. For those two types a
step-by-step decode therefore sees different frequencies than one full forward pass (the same
behaviour as `transformers`); every other variant decodes exactly like the full pass.
`default_state(batch, max_len=T)` returns a `StaticKVCache` instead: buffers for T slots
allocated once and written in place, keys stored already rotated (except for the
length-dependent scalings and ReRoPE, which need the raw keys), so a decoding step reads the
cache once and copies nothing; a step of a dense (unpadded) causal cache calls SDPA without a
mask. Both caches give the same outputs.

Packed rows: `forward(x, seq_idx=...)` (see `ssm.packing`) attends within each document only
(block-diagonal mask, causal inside a block) and restarts RoPE / ALiBi positions at 0 per document.
Absolute (sinusoidal / learned) positions are added at the model input: see `positional.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssm.config import (
    AttentionConfig,
    BlockConfig,
    build,
    keyword_signature,
    split_options,
)
from ssm.layers import rope as _rope
from ssm.layers.nn import keyword_only
from ssm.packing import check_seq_idx
from ssm.packing import positions as doc_positions

POS_TYPES = ("none", "rope", "rope2d", "alibi")
IMPLS = ("auto", "sdpa", "explicit")
_NEEDS_TRAIN_LEN = ("dynamic", "yarn", "llama3", "longrope")


def _causal_option(options: dict) -> dict:
    """Accept the older `causal=` keyword as `bidirectional=not causal` (one spelling in configs)."""
    if "causal" in options:
        causal = options.pop("causal")
        if "bidirectional" in options and options["bidirectional"] == causal:
            raise ValueError(f"causal={causal!r} contradicts bidirectional={options['bidirectional']!r}")
        options["bidirectional"] = not causal
    return options


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi slopes (n_heads,): geometric `2^(-8 i / n)` for a power of two `n`; otherwise the
    slopes of the next lower power of two followed by every other slope of the next higher one."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    low = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = geometric(low) + geometric(2 * low)[0::2][: n_heads - low]
    return torch.tensor(slopes, dtype=torch.float64)


class StaticKVCache:
    """The KV cache of one causal attention layer, allocated once for `max_len` slots and written
    in place (`MultiHeadAttention.default_state(batch, max_len=...)`).

    Every call writes L slots for every row (a padded row marks its extra slots invalid), so
    `filled` is one number for the batch; `lengths` (B,) counts each row's real tokens, which is
    the position of its next token. `k` is stored rotated when `rotated` (RoPE applied once at
    write time). `dense` stays True while no padded call has been made: a decoding step then
    needs no attention mask.
    k, v: (B, n_heads, max_len, head_dim); pos: (B, max_len) int64; valid: (B, max_len) bool.
    """

    def __init__(self, batch_size: int, n_heads: int, head_dim: int, max_len: int, *, device=None,
                 dtype=torch.float32, rotated: bool = False):
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        self.k = torch.zeros(batch_size, n_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.filled, self.rotated, self.dense = 0, rotated, True

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def check(self, batch: int, n_heads: int, head_dim: int, device) -> None:
        want = (batch, n_heads, self.max_len, head_dim)
        if tuple(self.k.shape) != want or self.k.device != device:
            raise ValueError(f"StaticKVCache holds keys of shape {tuple(self.k.shape)} on {self.k.device}; this call "
                             f"needs {want} on {device} (batch, n_heads, max_len, head_dim)")

    def nbytes(self) -> int:
        """Bytes of the filled part of the keys and values (what one decoding step reads)."""
        return 2 * self.k[:, :, :self.filled].numel() * self.k.element_size()


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention. x (B, L, H) -> (y (B, L, H), next_state).

    `max_len` is the training length L_train: it is used by log-n scaling and fills
    `original_max_position_embeddings` of a RoPE scaling dict that needs it and leaves it out.
    `impl="auto"` uses SDPA unless the variant needs explicit scores (ReRoPE).
    """

    def __init__(self, d_model: int, *, config: AttentionConfig | None = None, device=None, dtype=None,
                 **options):
        super().__init__()
        cfg = build(AttentionConfig, config, _causal_option(options), type(self).__name__)
        n_heads, dropout, pos, impl = cfg.n_heads, cfg.dropout, cfg.pos, cfg.impl
        max_len, rope_scaling, log_n_scaling = cfg.max_len, cfg.rope_scaling, cfg.log_n_scaling
        rope_base, rope_interleaved, grid_width = cfg.rope_base, cfg.rope_interleaved, cfg.grid_width
        rotary_fraction, bias, causal = cfg.rotary_fraction, cfg.bias, not cfg.bidirectional
        self.config = cfg
        if d_model < 1 or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        if pos not in POS_TYPES:
            raise ValueError(f"pos must be one of {POS_TYPES}, got {pos!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if log_n_scaling and (max_len is None or max_len < 2):
            raise ValueError("log_n_scaling needs max_len (the training length) >= 2")
        if rope_scaling is not None and pos not in ("rope", "rope2d"):
            raise ValueError(f"rope_scaling needs pos='rope' or 'rope2d', got pos={pos!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal, self.pos, self.dropout = causal, pos, dropout
        self.rope_base, self.rope_interleaved, self.grid_width = rope_base, rope_interleaved, grid_width
        self.log_n_scaling, self.max_len = log_n_scaling, max_len
        self.rope_scaling = self._resolve_scaling(rope_scaling, max_len)
        kind = None if self.rope_scaling is None else self.rope_scaling["type"]
        self.rerope = kind in ("rerope", "leaky_rerope")
        if self.rerope and (pos != "rope" or impl == "sdpa"):
            raise ValueError(f"{kind} needs pos='rope' and the explicit-score path (impl='auto' or 'explicit')")
        self.impl = "explicit" if impl == "explicit" or self.rerope else "sdpa"
        self.rotary_dim = 0
        self._freq_cache: dict = {}
        if pos in ("rope", "rope2d"):
            if not 0.0 < rotary_fraction <= 1.0:
                raise ValueError(f"rotary_fraction must be in (0, 1], got {rotary_fraction}")
            self.rotary_dim = int(self.head_dim * rotary_fraction)
            multiple = 4 if pos == "rope2d" else 2
            if self.rotary_dim < multiple or self.rotary_dim % multiple:
                raise ValueError(f"rotary dim head_dim*rotary_fraction = {self.rotary_dim} must be a positive "
                                 f"multiple of {multiple} for pos={pos!r}")
        if pos == "rope2d" and (grid_width is None or grid_width < 1):
            raise ValueError("pos='rope2d' needs grid_width (image width, row-major flattening) >= 1")
        if pos == "rope2d" and self.rerope:
            raise ValueError("ReRoPE is only defined for pos='rope'")
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, device=device, dtype=dtype)
        if pos == "alibi":
            self.register_buffer("slopes", alibi_slopes(n_heads).to(device=device, dtype=torch.float32),
                                 persistent=False)

    @staticmethod
    def _resolve_scaling(scaling: dict | None, max_len: int | None) -> dict | None:
        if scaling is None:
            return None
        scaling = dict(scaling)
        if scaling.get("type") in _NEEDS_TRAIN_LEN and "original_max_position_embeddings" not in scaling:
            if max_len is None:
                raise ValueError(f"rope_scaling {scaling.get('type')!r} needs original_max_position_embeddings "
                                 "(or max_len = the training length)")
            scaling["original_max_position_embeddings"] = max_len
        return _rope.parse_scaling(scaling)

    def _inv_freq(self, k_pos: torch.Tensor) -> tuple[torch.Tensor, float]:
        """float64 frequencies on k_pos's device (cached per device) and the cos/sin scale."""
        kind = None if self.rope_scaling is None else self.rope_scaling["type"]
        seq_len = None
        if kind in ("dynamic", "longrope"):  # these depend on the current length (a host sync)
            seq_len = int(k_pos.max().item()) + 1 if k_pos.numel() else 1
        key = (str(k_pos.device), seq_len)
        if key not in self._freq_cache:
            dim = self.rotary_dim // 2 if self.pos == "rope2d" else self.rotary_dim
            inv_freq, scale = _rope.rope_frequencies(dim, base=self.rope_base, scaling=self.rope_scaling,
                                                     seq_len=seq_len)
            if seq_len is not None:
                self._freq_cache.clear()  # keep one length-dependent entry, not one per length
            self._freq_cache[key] = (inv_freq.to(k_pos.device), scale)
        return self._freq_cache[key]

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
        # x (B, nh, L, D), positions (B, L)
        if self.pos == "rope2d":
            ang = _rope.axial_angles(positions, inv_freq, self.grid_width)  # (B, L, R/2)
        else:
            ang = _rope.rope_angles(positions, inv_freq)  # (B, L, R/2)
        cos, sin = (scale * ang.cos())[:, None], (scale * ang.sin())[:, None]  # (B, 1, L, R/2)
        return _rope.apply_rotary(x, cos, sin, interleaved=self.rope_interleaved)

    def default_state(self, batch_size: int, device=None, *, max_len: int | None = None):
        """Empty KV cache. Without `max_len`: the dynamic cache, a dict of raw (unrotated) keys and
        values (B, n_heads, 0, head_dim), their positions and a validity mask (B, 0). With
        `max_len`: a `StaticKVCache` of `max_len` slots (prompt + generated tokens)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        w = self.qkv.weight
        device = w.device if device is None else device
        if max_len is not None:
            if not self.causal:
                raise ValueError("a KV cache is only supported for causal attention")
            return StaticKVCache(batch_size, self.n_heads, self.head_dim, max_len, device=device, dtype=w.dtype,
                                 rotated=self.rotary_dim > 0 and not self._raw_keys())
        kv = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=w.dtype)
        return {"k": kv, "v": kv.clone(), "pos": torch.zeros(batch_size, 0, dtype=torch.long, device=device),
                "valid": torch.zeros(batch_size, 0, dtype=torch.bool, device=device)}

    def _raw_keys(self) -> bool:
        """True when keys cannot be rotated once and kept: frequencies that depend on the current
        length, or ReRoPE (its scores combine several rotations of the raw keys)."""
        kind = None if self.rope_scaling is None else self.rope_scaling["type"]
        return self.rerope or kind in ("dynamic", "longrope")

    def step(self, x_t: torch.Tensor, state) -> tuple[torch.Tensor, dict | StaticKVCache]:
        """One decoding step: x_t (B, H) -> (y_t (B, H), state). A `StaticKVCache` is updated in
        place and returned; a dynamic cache is returned grown by one entry."""
        if x_t.dim() != 2:
            raise ValueError(f"x_t must be (B, H), got shape {tuple(x_t.shape)}")
        y, state = self.forward(x_t[:, None], state=state)
        return y[:, 0], state

    def _check_lengths(self, lengths, b: int, length: int, dev, has_state: bool) -> torch.Tensor | None:
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths, device=dev)
        lo = 0 if has_state else 1
        if lengths.shape != (b,) or bool((lengths < lo).any()) or bool((lengths > length).any()):
            raise ValueError(f"lengths must be shape ({b},) with values in [{lo}, {length}], got "
                             f"shape {tuple(lengths.shape)}")
        return lengths

    @keyword_only("state", "lengths", "seq_idx")
    def forward(self, x: torch.Tensor, *, state=None, lengths: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, dict | StaticKVCache | None]:
        """x (B, L, H) -> (y (B, L, H), next_state). `state`: a KV cache from `default_state`
        (causal only); `lengths` (B,): right padding; `seq_idx` (B, L): packed documents."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, L, {self.d_model}), got shape {tuple(x.shape)}")
        if state is not None and not self.causal:
            raise ValueError("state (KV cache) is only supported for causal attention")
        b, length, _ = x.shape
        dev = x.device
        lengths = self._check_lengths(lengths, b, length, dev, state is not None)
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, L, D)
        if isinstance(state, StaticKVCache):
            return self._forward_static(q, k, v, state, lengths)
        ar = torch.arange(length, device=dev)
        new_valid = torch.ones(b, length, dtype=torch.bool, device=dev) if lengths is None else (
            ar[None, :] < lengths[:, None])  # (B, L)
        doc = None
        if seq_idx is not None:
            if state is not None:
                raise ValueError("seq_idx (packed documents) cannot be combined with a KV cache (state)")
            if self.rotary_dim and self._raw_keys() and not self.rerope:
                raise ValueError(f"seq_idx is not supported with RoPE scaling {self.rope_scaling['type']!r} "
                                 "(its frequencies depend on each document's length)")
            doc = check_seq_idx(seq_idx, b, length).to(dev)  # (B, L)
            q_pos = doc_positions(doc)  # (B, L)
        else:
            start = torch.zeros(b, dtype=torch.long, device=dev) if state is None else state["valid"].sum(1)
            q_pos = start[:, None] + ar[None, :]  # (B, L)
        k_pos, valid = q_pos, new_valid
        if state is not None:
            k, v = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)  # (B, nh, T, D)
            k_pos = torch.cat([state["pos"], q_pos], dim=1)  # (B, T)
            valid = torch.cat([state["valid"], new_valid], dim=1)  # (B, T)
        next_state = {"k": k, "v": v, "pos": k_pos, "valid": valid} if self.causal else None
        plain = state is None and lengths is None and doc is None
        y = self._attend(q, k, v, q_pos, k_pos, valid, mask=("causal" if self.causal else "none") if plain else "full",
                         doc=doc)  # (B, nh, L, D)
        return self.out_proj(y.transpose(1, 2).reshape(b, length, self.d_model)), next_state

    def _forward_static(self, q, k, v, cache: StaticKVCache, lengths) -> tuple[torch.Tensor, StaticKVCache]:
        """Write the new keys/values into the preallocated slots, attend over the filled prefix."""
        b, _, length, _ = q.shape
        cache.check(b, self.n_heads, self.head_dim, q.device)
        n = cache.filled
        if n + length > cache.max_len:
            raise ValueError(f"StaticKVCache of max_len={cache.max_len} holds {n} slots: no room for {length} more")
        q_pos = cache.lengths[:, None] + torch.arange(length, device=q.device)  # (B, L)
        if cache.rotated:
            inv_freq, cs = self._inv_freq(q_pos)
            q, k = self._rotate(q, q_pos, inv_freq, cs), self._rotate(k, q_pos, inv_freq, cs)
        cache.k[:, :, n:n + length] = k
        cache.v[:, :, n:n + length] = v
        cache.pos[:, n:n + length] = q_pos
        if lengths is None:
            cache.valid[:, n:n + length] = True
            cache.lengths += length
        else:
            new_valid = torch.arange(length, device=q.device)[None, :] < lengths[:, None]  # (B, L)
            cache.valid[:, n:n + length] = new_valid
            cache.lengths += lengths
            cache.dense = False
        cache.filled = n + length
        t = cache.filled
        if cache.dense and self.pos != "alibi" and length == 1:
            mask = "none"  # every cached key is at an earlier position and valid
        elif cache.dense and self.pos != "alibi" and n == 0:
            mask = "causal"
        else:
            mask = "full"
        y = self._attend(q, cache.k[:, :, :t], cache.v[:, :, :t], q_pos, cache.pos[:, :t], cache.valid[:, :t],
                         mask=mask, rotated=cache.rotated)  # (B, nh, L, D)
        return self.out_proj(y.transpose(1, 2).reshape(b, length, self.d_model)), cache

    def _attend(self, q, k, v, q_pos, k_pos, valid, *, mask: str, doc=None, rotated: bool = False) -> torch.Tensor:
        """mask: "none" (every key visible), "causal" (SDPA's own causal mask: query i sees keys
        <= i, no padding) or "full" (validity, causality by position, documents, ALiBi)."""
        inv_freq, cs = None, 1.0
        if self.rotary_dim and not rotated:
            inv_freq, cs = self._inv_freq(k_pos)
            if not self.rerope:
                q, k = self._rotate(q, q_pos, inv_freq, cs), self._rotate(k, k_pos, inv_freq, cs)
        p_drop = self.dropout if self.training else 0.0
        allowed = None
        if mask == "full" or self.pos == "alibi" or self.impl != "sdpa" or (self.log_n_scaling and not self.causal):
            allowed = valid[:, None, None, :]  # (B, 1, 1, T)
            if self.causal:
                allowed = allowed & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])  # (B, 1, L, T)
            if doc is not None:
                allowed = allowed & (doc[:, None, None, :] == doc[:, None, :, None])  # (B, 1, L, T)
        if self.log_n_scaling:
            n = q_pos + 1 if self.causal else allowed.sum(-1)[:, 0]  # (B, L)
            q = q * _rope.log_n_scale(n, self.max_len).to(q.dtype)[:, None, :, None]
        bias = None
        if self.pos == "alibi":
            dist = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).abs().to(q.dtype)  # (B, 1, L, T)
            bias = -self.slopes.to(q.dtype)[None, :, None, None] * dist  # (B, nh, L, T)
        if self.impl == "sdpa":
            if mask != "full" and bias is None:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=mask == "causal")
            attn_mask = allowed if bias is None else bias.masked_fill(~allowed, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p_drop)
        if self.rerope:
            cfg = self.rope_scaling
            leak = cfg["factor"] if cfg["type"] == "leaky_rerope" else None
            scores = _rope.rerope_scores(q, k, q_pos[:, None], k_pos[:, None], inv_freq, window=cfg["window"],
                                         leak=leak, interleaved=self.rope_interleaved, cos_scale=cs)
            scores = scores.to(q.dtype) / math.sqrt(self.head_dim)  # (B, nh, L, T)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, nh, L, T)
        if bias is not None:
            scores = scores + bias
        attn = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # (B, nh, L, T)
        return F.dropout(attn, p=p_drop, training=self.training) @ v


class TransformerBlock(nn.Module):
    """Residual attention + GELU MLP block. x (B, L, H) -> (y (B, L, H), next_state).

    Pre-norm (default): `x + attn(norm(x))`, then `x + mlp(norm(x))`; post-norm normalizes after
    each residual sum. Settings: `ssm.config.AttentionConfig` (attention, MLP width) and
    `ssm.config.BlockConfig` (prenorm); keywords of either are accepted.
    """

    def __init__(self, d_model: int, *, config: AttentionConfig | None = None, block: BlockConfig | None = None,
                 device=None, dtype=None, **options):
        super().__init__()
        layer_options, block_options = split_options(options, AttentionConfig)
        cfg = build(AttentionConfig, config, _causal_option(layer_options), "TransformerBlock")
        block = build(BlockConfig, block, block_options, "TransformerBlock")
        if block.norm != "layer" or block.d_ff is not None:
            raise ValueError(f"TransformerBlock uses LayerNorm and its MLP width is AttentionConfig.d_mlp: "
                             f"block.norm must be 'layer' and block.d_ff None, got {block.norm!r}, {block.d_ff!r}")
        d_mlp = 4 * d_model if cfg.d_mlp is None else cfg.d_mlp
        if d_mlp < 1:
            raise ValueError(f"d_mlp must be >= 1, got {d_mlp}")
        self.prenorm, dropout = block.prenorm, cfg.dropout
        self.attn = MultiHeadAttention(d_model, config=cfg, device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(d_model, device=device, dtype=dtype)
        self.norm2 = nn.LayerNorm(d_model, device=device, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp, device=device, dtype=dtype), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(d_mlp, d_model, device=device, dtype=dtype))
        self.drop = nn.Dropout(dropout)

    def default_state(self, batch_size: int, device=None, *, max_len: int | None = None):
        """The attention's KV cache: dynamic (dict) or, with `max_len`, a `StaticKVCache`."""
        return self.attn.default_state(batch_size, device=device, max_len=max_len)

    @keyword_only("state", "lengths", "seq_idx")
    def forward(self, x: torch.Tensor, *, state=None, lengths: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, dict | StaticKVCache | None]:
        if self.prenorm:
            a, next_state = self.attn(self.norm1(x), state=state, lengths=lengths, seq_idx=seq_idx)
            x = x + self.drop(a)
            return x + self.drop(self.mlp(self.norm2(x))), next_state
        a, next_state = self.attn(x, state=state, lengths=lengths, seq_idx=seq_idx)
        x = self.norm1(x + self.drop(a))
        return self.norm2(x + self.drop(self.mlp(x))), next_state

    def step(self, x_t: torch.Tensor, state):
        """One decoding step: x_t (B, H) -> (y_t (B, H), state); see `MultiHeadAttention.step`."""
        if x_t.dim() != 2:
            raise ValueError(f"x_t must be (B, H), got shape {tuple(x_t.shape)}")
        y, state = self.forward(x_t[:, None], state=state)
        return y[:, 0], state


MultiHeadAttention.__init__.__signature__ = keyword_signature(MultiHeadAttention.__init__, AttentionConfig,
                                                              after="config")
TransformerBlock.__init__.__signature__ = keyword_signature(TransformerBlock.__init__, AttentionConfig,
                                                            after="block")
