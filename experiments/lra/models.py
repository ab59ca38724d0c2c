"""LRA task models: a `ssm.models.SequenceModel` backbone plus the task's input and output heads.

- Token tasks (ListOps, Text, and pixels with `data.pixel_input="tokens"`): an embedding over the
  task's vocabulary.
- Pixel tasks with `data.pixel_input="real"` (what S4 did): each pixel enters as one real channel
  `value / 255` (d_input = 1).
- Retrieval (SPEC section 6): one shared encoder reads both documents, each is pooled to `u`, `v`,
  and an MLP classifies `[u, v, u*v, u-v]`.
"""
from __future__ import annotations

import torch
from torch import nn

from experiments.lra.config import PIXEL_TASKS, Config


def layer_kwargs(cfg: Config) -> dict:
    """Keyword arguments of the residual block for the configured model type."""
    m = cfg.model
    if cfg.model_name == "transformer":
        kwargs = {"n_heads": m.n_heads}
        if m.d_mlp is not None:
            kwargs["d_mlp"] = m.d_mlp
        return kwargs
    kwargs = {"d_state": m.d_state, "norm": m.norm, "bidirectional": m.bidirectional, "dt_min": m.dt_min,
              "dt_max": m.dt_max, "ssm_lr": cfg.optim.ssm_lr}
    if m.init is not None:
        kwargs["init"] = m.init
    return kwargs


def _backbone(cfg: Config, *, d_output: int, vocab_size: int | None, d_input: int | None,
              max_len: int, device=None, dtype=None) -> nn.Module:
    from ssm.models import SequenceModel

    m = cfg.model
    if m.pooling == "cls":
        max_len += 1  # the CLS token is appended after the last real position
    return SequenceModel(
        d_output, vocab_size=vocab_size, d_input=d_input, d_model=m.d_model, n_layers=m.n_layers,
        layer=cfg.model_name, layer_kwargs=layer_kwargs(cfg), pooling=m.pooling, pos=m.pos,
        max_len=max_len, prenorm=m.prenorm, dropout=m.dropout, device=device, dtype=dtype)


class LRAClassifier(nn.Module):
    """Single-sequence classifier: `forward(x (B, L) long, lengths (B,)) -> logits (B, n_classes)`."""

    def __init__(self, cfg: Config, *, n_classes: int, vocab_size: int, max_len: int, device=None, dtype=None):
        super().__init__()
        self.real_pixels = cfg.task in PIXEL_TASKS and cfg.data.pixel_input == "real"
        self.backbone = _backbone(cfg, d_output=n_classes, vocab_size=None if self.real_pixels else vocab_size,
                                  d_input=1 if self.real_pixels else None, max_len=max_len,
                                  device=device, dtype=dtype)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.real_pixels:
            return (x.float() / 255.0).unsqueeze(-1)  # (B, L, 1)
        return x

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.backbone(self._inputs(x), lengths=lengths)  # (B, n_classes)
        return out


class RetrievalClassifier(nn.Module):
    """Two-tower classifier: `forward(x (B, 2, L) long, lengths (B, 2)) -> logits (B, n_classes)`."""

    def __init__(self, cfg: Config, *, n_classes: int, vocab_size: int, max_len: int, device=None, dtype=None):
        super().__init__()
        d = cfg.model.d_model
        hidden = cfg.model.head_hidden or d
        # The backbone's own decoder is unused: only its pooled features feed the head.
        self.encoder = _backbone(cfg, d_output=n_classes, vocab_size=vocab_size, d_input=None,
                                 max_len=max_len, device=device, dtype=dtype)
        self.head = nn.Sequential(
            nn.Linear(4 * d, hidden, device=device, dtype=dtype), nn.GELU(),
            nn.Linear(hidden, n_classes, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(f"retrieval input must be (B, 2, L), got {tuple(x.shape)}")
        B = x.shape[0]
        both = torch.cat([x[:, 0], x[:, 1]], dim=0)  # (2B, L): one pass through the shared encoder
        both_len = None if lengths is None else torch.cat([lengths[:, 0], lengths[:, 1]], dim=0)  # (2B,)
        feats = self.encoder.features(both, lengths=both_len)  # (2B, d_model)
        u, v = feats[:B], feats[B:]  # (B, d_model) each
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))  # (B, n_classes)


def build_model(cfg: Config, *, n_classes: int, vocab_size: int, max_len: int, dual: bool,
                device=None, dtype=None) -> nn.Module:
    """The LRA model for `cfg.task` / `cfg.model_name` with the task's sizes."""
    cls = RetrievalClassifier if dual else LRAClassifier
    return cls(cfg, n_classes=n_classes, vocab_size=vocab_size, max_len=max_len, device=device, dtype=dtype)
