"""Small backbones: encoder -> N residual blocks -> final norm -> pooling -> decoder.

`SequenceModel` takes token ids (B, L) (`vocab_size`) or real features (B, L, d_input) (`d_input`)
and stacks `S4Block`s (`layer="s4d"` diagonal, `"s4"` DPLR) or `TransformerBlock`s
(`layer="transformer"`, from `ssm.layers.attention`); `layer_kwargs` go to every block (for S4
blocks e.g. `d_state`, `n_ssm`, `dt_transform`, `ssm_lr`, `dt_lr`, `tie_dropout`, `norm`; see
`ssm.layers.block.S4Block`). Right-padded batches pass `lengths` (B,);
padding never reaches real positions or pooled features.

Pooling: "mean" over real positions, "last" real position, "cls", or "none" (per position).
"cls" writes a learned token right after each row's last real position (index `lengths`, or L),
so it sees the whole sequence under causal and bidirectional layers alike; with learned absolute
positions `max_len` must allow L + 1. Streaming (`state`, `step`) needs pooling "none" or
"last" and pos="none" (absolute positions do not know the stream offset).
"""
from __future__ import annotations

import torch
from torch import nn

from ssm.layers.block import S4Block
from ssm.layers.nn import check_lengths, length_mask

LAYERS = ("s4d", "s4", "transformer")
POOLINGS = ("mean", "last", "cls", "none")
POS = ("none", "sinusoidal", "learned")


class SequenceModel(nn.Module):
    """Sequence classifier/regressor backbone; see the module docstring."""

    def __init__(self, d_output: int, *, vocab_size: int | None = None, d_input: int | None = None,
                 d_model: int = 128, n_layers: int = 4, layer: str = "s4d", layer_kwargs: dict | None = None,
                 pooling: str = "mean", pos: str = "none", max_len: int | None = None, prenorm: bool = True,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if (vocab_size is None) == (d_input is None):
            raise ValueError(f"give exactly one of vocab_size (token ids) or d_input (real features), "
                             f"got vocab_size={vocab_size!r}, d_input={d_input!r}")
        for name, allowed, value in (("layer", LAYERS, layer), ("pooling", POOLINGS, pooling), ("pos", POS, pos)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        fk = dict(device=device, dtype=dtype)
        self.vocab_size, self.d_input, self.d_model = vocab_size, d_input, d_model
        self.pooling, self.pos_kind = pooling, pos
        self.encoder = (nn.Embedding(vocab_size, d_model, **fk) if vocab_size is not None
                        else nn.Linear(d_input, d_model, **fk))
        self.cls = nn.Parameter(torch.randn(d_model, **fk) * 0.02) if pooling == "cls" else None
        self.pos = None
        if pos != "none":
            from ssm.layers.positional import AbsolutePositionalEmbedding
            self.pos = AbsolutePositionalEmbedding(pos, d_model, max_len, **fk)
        kwargs = dict(layer_kwargs or {})
        if layer == "transformer":
            from ssm.layers.attention import TransformerBlock
            self.blocks = nn.ModuleList(TransformerBlock(d_model, dropout=dropout, prenorm=prenorm, **kwargs, **fk)
                                        for _ in range(n_layers))
        else:
            mode = "diag" if layer == "s4d" else "dplr"
            if "mode" in kwargs and kwargs["mode"] != mode:
                raise ValueError(f"layer={layer!r} implies mode={mode!r}, got layer_kwargs mode={kwargs['mode']!r}")
            kwargs["mode"] = mode
            self.blocks = nn.ModuleList(S4Block(d_model, dropout=dropout, prenorm=prenorm, **kwargs, **fk)
                                        for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model, **fk) if prenorm else nn.Identity()
        self.decoder = nn.Linear(d_model, d_output, **fk)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is not None:
            if x.dim() != 2 or x.dtype not in (torch.long, torch.int32, torch.int64):
                raise ValueError(f"x must be token ids of shape (B, L) and integer dtype, got "
                                 f"{tuple(x.shape)} {x.dtype}")
            return self.encoder(x)                                     # (B, L, H)
        if x.dim() != 3 or x.shape[-1] != self.d_input:
            raise ValueError(f"x must have shape (B, L, {self.d_input}), got {tuple(x.shape)}")
        return self.encoder(x)                                         # (B, L, H)

    def _backbone(self, x, lengths, state):
        h = self._encode(x)
        Bsz, L, _ = h.shape
        lengths = check_lengths(lengths, Bsz, L)
        if state is not None and (self.pos is not None or self.pooling == "cls"):
            raise ValueError("state passing needs pos='none' and pooling 'none', 'last' or 'mean'")
        if self.pooling == "cls":
            where = lengths if lengths is not None else torch.full((Bsz,), L, device=h.device, dtype=torch.long)
            h = torch.cat([h, h.new_zeros(Bsz, 1, h.shape[-1])], dim=1)   # (B, L+1, H)
            at_cls = (torch.arange(L + 1, device=h.device) == where[:, None]).unsqueeze(-1)
            h = torch.where(at_cls, self.cls.to(h.dtype), h)
            lengths = where + 1
        if self.pos is not None:
            h = self.pos(h)
        states = [None] * len(self.blocks) if state is None else list(state)
        if len(states) != len(self.blocks):
            raise ValueError(f"state must be a list of {len(self.blocks)} layer states, got {len(states)}")
        next_states = []
        for block, s in zip(self.blocks, states):
            h, s = block(h, s, lengths)
            next_states.append(s)
        return self.norm(h), lengths, (next_states if state is not None else None)

    def _pool(self, h: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        Bsz, L, _ = h.shape
        if self.pooling == "none":
            return h                                                   # (B, L, H)
        if self.pooling == "mean":
            if lengths is None:
                return h.mean(dim=1)
            mask = length_mask(lengths, L).unsqueeze(-1).to(h.dtype)   # (B, L, 1)
            return (h * mask).sum(1) / lengths[:, None].to(h.dtype)    # (B, H)
        idx = torch.full((Bsz,), L, device=h.device, dtype=torch.long) if lengths is None else lengths
        return h[torch.arange(Bsz, device=h.device), idx - 1]         # (B, H): last real / the cls token

    def features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features (B, d_model) ((B, L, d_model) with pooling="none")."""
        h, lengths, _ = self._backbone(x, lengths, None)
        return self._pool(h, lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, state: list | None = None):
        """x -> (out (B, d_output), or (B, L, d_output) with pooling="none"; next_state or None)."""
        h, lengths, next_state = self._backbone(x, lengths, state)
        return self.decoder(self._pool(h, lengths)), next_state

    def default_state(self, batch_size: int, device=None) -> list:
        return [block.default_state(batch_size, device=device) for block in self.blocks]

    def step(self, x_t: torch.Tensor, state: list):
        """One position: token ids (B,) or features (B, d_input) -> (out_t (B, d_output), state)."""
        if self.pos is not None or self.pooling not in ("none", "last"):
            raise ValueError("step needs pos='none' and pooling 'none' or 'last'")
        h = self._encode(x_t[:, None])[:, 0]                           # (B, H)
        new_state = []
        for block, s in zip(self.blocks, state):
            h, s = block.step(h, s)
            new_state.append(s)
        return self.decoder(self.norm(h)), new_state
