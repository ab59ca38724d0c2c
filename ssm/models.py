"""Small backbones: encoder -> N residual blocks -> final norm -> pooling -> decoder.

`SequenceModel` takes token ids (B, L) (`vocab_size`) or real features (B, L, d_input) (`d_input`)
and stacks one kind of residual block (`LAYERS`: `layer="s4d"` diagonal and `"s4"` DPLR S4
blocks, `"transformer"` attention blocks, `"mamba"` / `"mamba2"` selective blocks), each built from one layer config (`ssm.config`) and
one `BlockConfig`. Right-padded batches pass `lengths=` (B,); padding never reaches real
positions or pooled features.

Pooling: "mean" over real positions, "last" real position, "cls", or "none" (per position).
"cls" writes a learned token right after each row's last real position (index `lengths`, or L),
so it sees the whole sequence under causal and bidirectional layers alike; with learned absolute
positions `max_len` must allow L + 1. Streaming (`state`, `step`) needs pooling "none" or
"last" and pos="none" (absolute positions do not know the stream offset).
"""
from __future__ import annotations

import torch
from torch import nn

from ssm.config import (RETIRED, AttentionConfig, BlockConfig, Mamba2Config, Mamba3Config, MambaConfig, S4Config, build,
                        split_options)
from ssm.layers.nn import check_lengths, keyword_only, length_mask
from ssm.packing import check_seq_idx, doc_starts, positions, seq_idx_from_cu_seqlens

POOLINGS = ("mean", "last", "cls", "none")
POS = ("none", "sinusoidal", "learned")


def _s4_block(*args, **kwargs):
    from ssm.layers.block import S4Block
    return S4Block(*args, **kwargs)


def _transformer_block(*args, **kwargs):
    from ssm.layers.attention import TransformerBlock
    return TransformerBlock(*args, **kwargs)


def _selective_block(*args, **kwargs):
    from ssm.layers.block import SelectiveBlock
    return SelectiveBlock(*args, **kwargs)


# layer name -> (block constructor, layer config class, settings the name fixes)
LAYERS = {
    "s4d": (_s4_block, S4Config, {"mode": "diag"}),
    "s4": (_s4_block, S4Config, {"mode": "dplr"}),
    "transformer": (_transformer_block, AttentionConfig, {}),
    "mamba": (_selective_block, MambaConfig, {}),
    "mamba2": (_selective_block, Mamba2Config, {}),
    "mamba3": (_selective_block, Mamba3Config, {}),
}


def _layer_configs(layer: str, layer_config, block, legacy: dict, bidirectional):
    """(layer config, block config) of `SequenceModel` from its arguments (see its docstring)."""
    make, cls, fixed = LAYERS[layer]
    unknown = set(legacy) - {"layer_kwargs", "prenorm", "dropout"}
    for key in sorted(unknown & set(RETIRED)):
        raise TypeError(f"SequenceModel: {key!r} is no longer a model or layer argument; {RETIRED[key]}")
    if unknown:
        raise TypeError(f"SequenceModel got unexpected keyword argument(s) {sorted(unknown)}")
    options = dict(legacy.get("layer_kwargs") or {})
    if "dropout" in legacy:
        options["dropout"] = legacy["dropout"]
    if "prenorm" in legacy:
        options["prenorm"] = legacy["prenorm"]
    layer_options, block_options = split_options(options, cls)
    if layer == "transformer" and "causal" in layer_options:
        layer_options["bidirectional"] = not layer_options.pop("causal")
    cfg = build(cls, layer_config, layer_options, f"SequenceModel(layer={layer!r})")
    for key, value in fixed.items():
        explicit = key in layer_options or (isinstance(layer_config, dict) and key in layer_config)
        if getattr(cfg, key) != value and explicit:
            raise ValueError(f"layer={layer!r} implies {key}={value!r}, got {key}={getattr(cfg, key)!r}")
        setattr(cfg, key, value)
    if bidirectional is not None:
        if not isinstance(bidirectional, bool):
            raise ValueError(f"bidirectional must be None or a bool, got {bidirectional!r}")
        if not hasattr(cfg, "bidirectional"):
            if bidirectional:
                raise ValueError(f"layer={layer!r} is causal only: bidirectional=True is not supported")
        else:
            cfg.bidirectional = bidirectional
    return make, cfg, build(BlockConfig, block, block_options, "SequenceModel")


class SequenceModel(nn.Module):
    """Sequence classifier/regressor backbone; see the module docstring.

    layer: a name in `LAYERS` (it decides `mode` for "s4d"/"s4"); layer_config: its config (`S4Config` for "s4d"/"s4",
    `AttentionConfig` for "transformer") or a dict of its fields; block: `BlockConfig`
    (prenorm, norm, d_ff). bidirectional: None keeps the layer config's causality (causal by
    default for every kind); True/False sets it for every block. The older `layer_kwargs=`
    (a dict of layer and block fields), `prenorm=` and `dropout=` keywords still work.
    """

    def __init__(self, d_output: int, *, vocab_size: int | None = None, d_input: int | None = None,
                 d_model: int = 128, n_layers: int = 4, layer: str = "s4d", layer_config=None,
                 block: BlockConfig | None = None, bidirectional: bool | None = None, pooling: str = "mean",
                 pos: str = "none", max_len: int | None = None, device=None, dtype=None, **legacy):
        super().__init__()
        if (vocab_size is None) == (d_input is None):
            raise ValueError(f"give exactly one of vocab_size (token ids) or d_input (real features), "
                             f"got vocab_size={vocab_size!r}, d_input={d_input!r}")
        for name, allowed, value in (("layer", tuple(LAYERS), layer), ("pooling", POOLINGS, pooling), ("pos", POS, pos)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        make, cfg, blk = _layer_configs(layer, layer_config, block, legacy, bidirectional)
        fk = dict(device=device, dtype=dtype)
        self.vocab_size, self.d_input, self.d_model = vocab_size, d_input, d_model
        self.pooling, self.pos_kind, self.layer_config, self.block_config = pooling, pos, cfg, blk
        self.encoder = (nn.Embedding(vocab_size, d_model, **fk) if vocab_size is not None
                        else nn.Linear(d_input, d_model, **fk))
        self.cls = nn.Parameter(torch.randn(d_model, **fk) * 0.02) if pooling == "cls" else None
        self.pos = None
        if pos != "none":
            from ssm.layers.positional import AbsolutePositionalEmbedding
            self.pos = AbsolutePositionalEmbedding(pos, d_model, max_len, **fk)
        self.blocks = nn.ModuleList(make(d_model, config=cfg, block=blk, **fk) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model, **fk) if blk.prenorm else nn.Identity()
        self.decoder = nn.Linear(d_model, d_output, **fk)

    def compile_step(self, *, backend: str = "fused"):
        """A fused inference step (`ssm.decode.compile_step`): the same arguments and results as
        `step`, with the state tensors advanced in place."""
        from ssm.decode import compile_step

        return compile_step(self, backend=backend)

    def set_l_max(self, l_max: int) -> None:
        """Set the length every S4 (DPLR) layer's learned Ct belongs to (the data's maximum length)."""
        for m in self.modules():
            if hasattr(m, "fixed_l_max"):
                m.l_max = l_max

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is not None:
            if x.dim() != 2 or x.dtype not in (torch.long, torch.int32, torch.int64):
                raise ValueError(f"x must be token ids of shape (B, L) and integer dtype, got "
                                 f"{tuple(x.shape)} {x.dtype}")
            return self.encoder(x)                                     # (B, L, H)
        if x.dim() != 3 or x.shape[-1] != self.d_input:
            raise ValueError(f"x must have shape (B, L, {self.d_input}), got {tuple(x.shape)}")
        return self.encoder(x)                                         # (B, L, H)

    def _packing(self, h: torch.Tensor, lengths, seq_idx, cu_seqlens) -> torch.Tensor | None:
        """The validated seq_idx (B, L) from `seq_idx` or `cu_seqlens` (one row), or None."""
        Bsz, L, _ = h.shape
        if cu_seqlens is not None:
            if seq_idx is not None:
                raise ValueError("give seq_idx or cu_seqlens, not both")
            if Bsz != 1:
                raise ValueError(f"cu_seqlens describes one packed row: x must have batch size 1, got {Bsz} "
                                 "(use seq_idx (B, L) for several rows)")
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, L).to(h.device)
        if seq_idx is None:
            return None
        if lengths is not None:
            raise ValueError("seq_idx (or cu_seqlens) and lengths cannot be combined: a packed row has no "
                             "right padding (put any padding in a document of its own)")
        if self.pooling == "cls":
            raise ValueError("pooling='cls' is not available for packed batches (seq_idx / cu_seqlens); "
                             "use 'mean', 'last' or 'none'")
        return check_seq_idx(seq_idx, Bsz, L)

    def _packed_positions(self, h: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
        """Absolute position embeddings restarting at 0 in every document."""
        from ssm.layers.positional import sinusoidal_table
        pos = positions(seq_idx)                                       # (B, L)
        if self.pos.kind == "learned":
            if int(pos.max()) >= self.pos.max_len:
                raise ValueError(f"a document is longer than max_len {self.pos.max_len} of the learned embedding")
            return h + self.pos.weight[pos].to(h.dtype)
        return h + sinusoidal_table(pos, self.d_model).to(h.dtype)

    def _backbone(self, x, lengths, state, seq_idx=None, cu_seqlens=None):
        h = self._encode(x)
        Bsz, L, _ = h.shape
        lengths = check_lengths(lengths, Bsz, L)
        seq_idx = self._packing(h, lengths, seq_idx, cu_seqlens)
        if state is not None and (self.pos is not None or self.pooling == "cls"):
            raise ValueError("state passing needs pos='none' and pooling 'none', 'last' or 'mean'")
        if self.pooling == "cls":
            where = lengths if lengths is not None else torch.full((Bsz,), L, device=h.device, dtype=torch.long)
            h = torch.cat([h, h.new_zeros(Bsz, 1, h.shape[-1])], dim=1)   # (B, L+1, H)
            at_cls = (torch.arange(L + 1, device=h.device) == where[:, None]).unsqueeze(-1)
            h = torch.where(at_cls, self.cls.to(h.dtype), h)
            lengths = where + 1
        if self.pos is not None:
            h = self.pos(h) if seq_idx is None else self._packed_positions(h, seq_idx)
        states = [None] * len(self.blocks) if state is None else self._check_states(state)
        next_states = []
        packed = {} if seq_idx is None else {"seq_idx": seq_idx}
        for block, s in zip(self.blocks, states):
            h, s = block(h, state=s, lengths=lengths, **packed)
            next_states.append(s)
        return self.norm(h), lengths, (next_states if state is not None else None), seq_idx

    @staticmethod
    def _pool_documents(h: torch.Tensor, seq_idx: torch.Tensor, how: str) -> torch.Tensor:
        """(n_docs, H): the mean or the last position of every document, row by row."""
        doc = torch.cumsum(doc_starts(seq_idx).flatten().long(), 0) - 1   # (B*L,): global document id
        n = int(doc[-1]) + 1
        flat = h.reshape(-1, h.shape[-1])                              # (B*L, H)
        if how == "last":
            ends = torch.zeros(n, dtype=torch.long, device=h.device).scatter_reduce_(
                0, doc, torch.arange(doc.numel(), device=h.device), reduce="amax")
            return flat[ends]                                          # (n_docs, H)
        total = flat.new_zeros(n, flat.shape[-1]).index_add_(0, doc, flat)
        count = torch.bincount(doc, minlength=n).to(flat.dtype)
        return total / count[:, None]                                  # (n_docs, H)

    def _pool(self, h: torch.Tensor, lengths: torch.Tensor | None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        Bsz, L, _ = h.shape
        if self.pooling == "none":
            return h                                                   # (B, L, H)
        if seq_idx is not None:
            return self._pool_documents(h, seq_idx, self.pooling)
        if self.pooling == "mean":
            if lengths is None:
                return h.mean(dim=1)
            mask = length_mask(lengths, L).unsqueeze(-1)               # (B, L, 1)
            # selected, not multiplied: a NaN at a padded position must not reach the mean
            return torch.where(mask, h, 0.0).sum(1) / lengths[:, None].to(h.dtype)   # (B, H)
        idx = torch.full((Bsz,), L, device=h.device, dtype=torch.long) if lengths is None else lengths
        return h[torch.arange(Bsz, device=h.device), idx - 1]         # (B, H): last real / the cls token

    def features(self, x: torch.Tensor, lengths: torch.Tensor | None = None, *,
                 seq_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features (B, d_model) ((B, L, d_model) with pooling="none"; (n_docs, d_model) when packed)."""
        h, lengths, _, seq_idx = self._backbone(x, lengths, None, seq_idx, cu_seqlens)
        return self._pool(h, lengths, seq_idx)

    def _check_states(self, state) -> list:
        if not isinstance(state, (list, tuple)) or len(state) != len(self.blocks):
            got = f"{len(state)} states" if isinstance(state, (list, tuple)) else type(state).__name__
            raise ValueError(f"state must be a list of {len(self.blocks)} layer states (one per block, "
                             f"see default_state), got {got}")
        return list(state)

    @keyword_only("lengths", "state")
    def forward(self, x: torch.Tensor, *, lengths: torch.Tensor | None = None, state: list | None = None,
                seq_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None):
        """x -> (out (B, d_output), or (B, L, d_output) with pooling="none"; next_state or None).

        Packed input: `seq_idx` (B, L) or, for B = 1, `cu_seqlens` (n_docs + 1,); pooled outputs
        are then (n_docs, d_output), one row per document. `state` feeds each row's first document
        and next_state is each row's last document's.
        """
        h, lengths, next_state, seq_idx = self._backbone(x, lengths, state, seq_idx, cu_seqlens)
        return self.decoder(self._pool(h, lengths, seq_idx)), next_state

    def default_state(self, batch_size: int, device=None, *, max_len: int | None = None) -> list:
        """One zero state per block. max_len: attention blocks get a preallocated KV cache of that
        many positions, written in place (`StaticKVCache`); None keeps their growing cache."""
        from ssm.layers.attention import TransformerBlock

        return [block.default_state(batch_size, device=device, max_len=max_len)
                if max_len is not None and isinstance(block, TransformerBlock)
                else block.default_state(batch_size, device=device) for block in self.blocks]

    def step(self, x_t: torch.Tensor, state: list):
        """One position: token ids (B,) or features (B, d_input) -> (out_t (B, d_output), state)."""
        if self.pos is not None or self.pooling not in ("none", "last"):
            raise ValueError("step needs pos='none' and pooling 'none' or 'last'")
        state = self._check_states(state)
        h = self._encode(x_t[:, None])[:, 0]                           # (B, H)
        new_state = []
        for block, s in zip(self.blocks, state):
            h, s = block.step(h, s)
            new_state.append(s)
        return self.decoder(self.norm(h)), new_state
