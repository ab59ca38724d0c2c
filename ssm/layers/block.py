"""`S4Block`: norm -> S4 -> dropout -> residual (-> optional GELU feed-forward), pre- or post-norm.

The residual block contract shared with `ssm.layers.attention.TransformerBlock`:
`Block(d_model, *, config=<layer config>, block=<BlockConfig>, device=None, dtype=None, **options)`
where `options` are fields of either config, `forward(x (B, L, H), *, state=None, lengths=None,
seq_idx=None) -> (y (B, L, H), next_state)` (`seq_idx` (B, L): packed documents, passed to the layer;
the norms and the feed-forward act per position, so they need nothing more), `default_state(batch_size, device=None)`,
`step(x_t (B, H), state) -> (y_t, state)`. The SSM itself is `ssm.layers.s4.S4` (docs/s4.md).
The block's dropouts use the layer's `dropout`; with `tie_dropout=True` every dropout of the block
(the S4 layer's, the residual branch's and the feed-forward's) is tied across the sequence: one
mask per (example, feature), as the public S4 LRA configurations do.
"""
from __future__ import annotations

import torch
from torch import nn

from ssm.config import BlockConfig, S4Config, build, keyword_signature, split_options
from ssm.layers.nn import MaskedNorm, SequenceDropout, keyword_only
from ssm.layers.s4 import S4


def _packed(seq_idx) -> dict:
    # Passed only when given, so a layer swapped in without packing support (an exported frozen
    # convolution) keeps working on unpacked input.
    return {} if seq_idx is None else {"seq_idx": seq_idx}


class S4Block(nn.Module):
    """Residual S4/S4D block. `block.d_ff=None` means no feed-forward sublayer."""

    def __init__(self, d_model: int, *, config: S4Config | None = None, block: BlockConfig | None = None,
                 device=None, dtype=None, **options):
        super().__init__()
        layer_options, block_options = split_options(options, S4Config)
        cfg = build(S4Config, config, layer_options, "S4Block")
        blk = build(BlockConfig, block, block_options, "S4Block")
        self.block_config, self.prenorm = blk, blk.prenorm
        self.layer = S4(d_model, config=cfg, device=device, dtype=dtype)
        dropout, tie = cfg.dropout, cfg.tie_dropout
        self.norm = MaskedNorm(d_model, kind=blk.norm, device=device, dtype=dtype)
        self.drop = SequenceDropout(dropout, tie=tie)
        self.ff = None
        d_ff = blk.d_ff
        if d_ff is not None:
            if isinstance(d_ff, bool) or not isinstance(d_ff, int) or d_ff < 1:
                raise ValueError(f"d_ff must be None or an int >= 1, got {d_ff!r}")
            self.norm_ff = MaskedNorm(d_model, kind=blk.norm, device=device, dtype=dtype)
            self.ff = nn.Sequential(nn.Linear(d_model, d_ff, device=device, dtype=dtype), nn.GELU(),
                                    SequenceDropout(dropout, tie=tie),
                                    nn.Linear(d_ff, d_model, device=device, dtype=dtype))

    def default_state(self, batch_size: int, device=None) -> torch.Tensor:
        return self.layer.default_state(batch_size, device=device)

    @keyword_only("state", "lengths")
    def forward(self, x: torch.Tensor, *, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None):
        """x (B, L, H) -> (y (B, L, H), next_state); see `S4.forward` for `state`, `lengths` and `seq_idx`."""
        packed = _packed(seq_idx)
        if self.prenorm:
            y, next_state = self.layer(self.norm(x, lengths), state=state, lengths=lengths, **packed)
            x = x + self.drop(y)                                       # (B, L, H)
            if self.ff is not None:
                x = x + self.drop(self.ff(self.norm_ff(x, lengths)))
            return x, next_state
        y, next_state = self.layer(x, state=state, lengths=lengths, **packed)
        x = self.norm(x + self.drop(y), lengths)                      # (B, L, H)
        if self.ff is not None:
            x = self.norm_ff(x + self.drop(self.ff(x)), lengths)
        return x, next_state

    def step(self, x_t: torch.Tensor, state: torch.Tensor):
        """One position: x_t (B, H) -> (y_t (B, H), state)."""
        if self.prenorm:
            y, state = self.layer.step(self.norm.step(x_t), state)
            x_t = x_t + self.drop(y)
            if self.ff is not None:
                x_t = x_t + self.drop(self.ff(self.norm_ff.step(x_t)))
            return x_t, state
        y, state = self.layer.step(x_t, state)
        x_t = self.norm.step(x_t + self.drop(y))
        if self.ff is not None:
            x_t = self.norm_ff.step(x_t + self.drop(self.ff(x_t)))
        return x_t, state


S4Block.__init__.__signature__ = keyword_signature(S4Block.__init__, S4Config, after="block")


class SelectiveBlock(nn.Module):
    """Residual block around a selective layer (`ssm.Mamba`, `ssm.Mamba2`): norm -> layer -> add.

    `config` is a `MambaConfig` or `Mamba2Config` (which layer is built follows from its type);
    `block` is a `BlockConfig` (prenorm, norm; `d_ff` must be None: the layers gate their own
    output). Same contract as `S4Block`. The selective layers have no dropout and are causal.
    """

    def __init__(self, d_model: int, *, config, block: BlockConfig | None = None, device=None, dtype=None):
        super().__init__()
        from ssm.config import Mamba2Config, Mamba3Config, MambaConfig
        from ssm.layers.mamba import Mamba
        from ssm.layers.mamba2 import Mamba2
        from ssm.layers.mamba3 import Mamba3
        layer_cls = {MambaConfig: Mamba, Mamba2Config: Mamba2, Mamba3Config: Mamba3}.get(type(config))
        if layer_cls is None:
            raise TypeError(f"SelectiveBlock: config must be a MambaConfig, Mamba2Config or Mamba3Config, "
                            f"got {type(config).__name__}")
        blk = build(BlockConfig, block, {}, "SelectiveBlock")
        if blk.d_ff is not None:
            raise ValueError(f"SelectiveBlock has no feed-forward sublayer: block.d_ff must be None, got {blk.d_ff!r}")
        self.block_config, self.prenorm = blk, blk.prenorm
        self.layer = layer_cls(d_model, config=config, device=device, dtype=dtype)
        self.norm = MaskedNorm(d_model, kind=blk.norm, device=device, dtype=dtype)

    def default_state(self, batch_size: int, device=None):
        return self.layer.default_state(batch_size, device=device)

    @keyword_only("state", "lengths")
    def forward(self, x: torch.Tensor, *, state=None, lengths: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None):
        """x (B, L, H) -> (y (B, L, H), next_state); `seq_idx` (B, L): packed documents."""
        packed = _packed(seq_idx)
        if self.prenorm:
            y, next_state = self.layer(self.norm(x, lengths), state=state, lengths=lengths, **packed)
            return x + y, next_state
        y, next_state = self.layer(x, state=state, lengths=lengths, **packed)
        return self.norm(x + y, lengths), next_state

    def step(self, x_t: torch.Tensor, state):
        """One position: x_t (B, H) -> (y_t (B, H), state)."""
        if self.prenorm:
            y, state = self.layer.step(self.norm.step(x_t), state)
            return x_t + y, state
        y, state = self.layer.step(x_t, state)
        return self.norm.step(x_t + y), state
