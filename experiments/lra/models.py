"""LRA task models: a `ssm.models.SequenceModel` backbone plus the task's input and output heads.

- Token tasks (ListOps, Text, and pixels with `data.pixel_input="tokens"`): an embedding over the
  task's vocabulary.
- Pixel tasks with `data.pixel_input="real"` (what S4 did): each pixel enters as one real channel
  `value / 255` (d_input = 1).
- Heads (`model.head`): "linear" (pooled features -> logits, S4's decoder), "mlp" (one hidden layer,
  the LRA Transformer's classifier head), "mlp2" (two hidden layers of `head_hidden` and half of it,
  the LRA dual-encoder head).
- Retrieval: one shared encoder reads both documents, each is pooled to `u`, `v`, and the head
  classifies `[u, v, u*v, u-v]` (`interaction="nli"`, S4) or `[u, v]` ("concat", LRA Transformer).
  The backbone's own decoder is replaced by the identity, so every parameter gets a gradient (plain
  DistributedDataParallel, no `find_unused_parameters`).
- Transformer positions: "sinusoidal"/"learned" are added at the input; "rope", "rope2d" (pixel
  grids) and "alibi" live inside attention, with any RoPE scaling of `ssm.layers.rope`
  (`config.rope_scaling_dict`), set on the nested `model.attention` config by `layer_config`.
  Learning rates are not layer settings: `make_optimizer` applies `optim.ssm_lr` / `optim.dt_lr`.
  Task descriptions: `docs/lra.md`.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from experiments.lra.config import ATTENTION_POS, Config, rope_scaling_dict, sequence_length
from experiments.lra.tasks import task_info


def layer_config(cfg: Config, train_len: int):
    """The layer config of the configured model type, with the fields the model sets itself.

    Mamba / Mamba-2: `model.mamba` / `model.mamba2` as they are (causal; nothing derived).

    `train_len` is the training sequence length (with the CLS token where there is one); attention
    positions that depend on it (log-n, YaRN, ...) take it as their training length, and an S4
    (DPLR) layer relates its learned C to it.
    """
    m = cfg.model
    if cfg.model_name in ("mamba", "mamba2"):
        return getattr(m, cfg.model_name)
    if cfg.model_name != "transformer":
        return dataclasses.replace(m.ssm, mode="dplr" if cfg.model_name == "s4" else "diag", l_max=None)
    att = dataclasses.replace(m.attention, pos="none", max_len=None, grid_width=None, rope_scaling=None)
    if m.pos in ATTENTION_POS:
        att.pos, att.max_len = m.pos, train_len
        if m.pos in ("rope", "rope2d"):
            att.rope_scaling = rope_scaling_dict(cfg)
        if m.pos == "rope2d":
            att.grid_width = task_info(cfg.task).resolution if cfg.data.pathfinder_resolution is None \
                else cfg.data.pathfinder_resolution
    return att


def _backbone(cfg: Config, *, d_output: int, vocab_size: int | None, d_input: int | None,
              max_len: int, device=None, dtype=None) -> nn.Module:
    from ssm.models import SequenceModel

    m = cfg.model
    if m.pooling == "cls":
        max_len += 1  # the CLS token is appended after the last real position
    model = SequenceModel(
        d_output, vocab_size=vocab_size, d_input=d_input, d_model=m.d_model, n_layers=m.n_layers,
        layer=cfg.model_name, layer_config=layer_config(cfg, max_len), block=m.block,
        bidirectional=m.bidirectional, pooling=m.pooling, pos="none" if m.pos in ATTENTION_POS else m.pos,
        max_len=max_len, device=device, dtype=dtype)
    # An S4 (DPLR) layer's learned C belongs to one length: the longest sequence of the run (left
    # unset, the first batch would fix it to that batch's length).
    model.set_l_max(max_len)
    return model


def make_head(cfg: Config, d_in: int, n_classes: int, device=None, dtype=None) -> nn.Module:
    """features (B, d_in) -> logits (B, n_classes), as `model.head` / `head_hidden` / `head_act` say."""
    m = cfg.model
    fk = dict(device=device, dtype=dtype)
    if m.head == "linear":
        return nn.Linear(d_in, n_classes, **fk)
    hidden = m.head_hidden or m.d_model
    act = nn.GELU if m.head_act == "gelu" else nn.ReLU
    if m.head == "mlp":
        return nn.Sequential(nn.Linear(d_in, hidden, **fk), act(), nn.Linear(hidden, n_classes, **fk))
    return nn.Sequential(nn.Linear(d_in, hidden, **fk), act(), nn.Linear(hidden, hidden // 2, **fk), act(),
                         nn.Linear(hidden // 2, n_classes, **fk))


class LRAClassifier(nn.Module):
    """Single-sequence classifier: `forward(x (B, L) long, lengths (B,)) -> logits (B, n_classes)`;
    `forward(x, seq_idx=...)` for packed rows."""

    def __init__(self, cfg: Config, *, n_classes: int, vocab_size: int, max_len: int, device=None, dtype=None):
        super().__init__()
        self.real_pixels = task_info(cfg.task).is_pixel and cfg.data.pixel_input == "real"
        self.backbone = _backbone(cfg, d_output=n_classes, vocab_size=None if self.real_pixels else vocab_size,
                                  d_input=1 if self.real_pixels else None, max_len=max_len,
                                  device=device, dtype=dtype)
        if cfg.model.head != "linear":  # the backbone's decoder becomes the configured head
            self.backbone.decoder = make_head(cfg, cfg.model.d_model, n_classes, device=device, dtype=dtype)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.real_pixels:
            return (x.float() / 255.0).unsqueeze(-1)  # (B, L, 1)
        return x

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, *,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Packed rows (`seq_idx` (R, W), `experiments.lra.packing`) give one row of logits per document."""
        out, _ = self.backbone(self._inputs(x), lengths=lengths, seq_idx=seq_idx)  # (B or n_docs, n_classes)
        return out


class RetrievalClassifier(nn.Module):
    """Two-tower classifier: `forward(x (B, 2, L) long, lengths (B, 2)) -> logits (B, n_classes)`."""

    def __init__(self, cfg: Config, *, n_classes: int, vocab_size: int, max_len: int, device=None, dtype=None):
        super().__init__()
        d = cfg.model.d_model
        self.interaction = cfg.model.interaction
        self.encoder = _backbone(cfg, d_output=n_classes, vocab_size=vocab_size, d_input=None,
                                 max_len=max_len, device=device, dtype=dtype)
        self.encoder.decoder = nn.Identity()  # only the pooled features are used
        n_feats = 4 if self.interaction == "nli" else 2
        self.head = make_head(cfg, n_feats * d, n_classes, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(f"retrieval input must be (B, 2, L), got {tuple(x.shape)}")
        B = x.shape[0]
        both = torch.cat([x[:, 0], x[:, 1]], dim=0)  # (2B, L): one pass through the shared encoder
        both_len = None if lengths is None else torch.cat([lengths[:, 0], lengths[:, 1]], dim=0)  # (2B,)
        feats = self.encoder.features(both, lengths=both_len)  # (2B, d_model)
        u, v = feats[:B], feats[B:]  # (B, d_model) each
        pair = [u, v, u * v, u - v] if self.interaction == "nli" else [u, v]
        return self.head(torch.cat(pair, dim=-1))  # (B, n_classes)


def build_model(cfg: Config, *, n_classes: int | None = None, vocab_size: int | None = None,
                max_len: int | None = None, dual: bool | None = None, device=None, dtype=None) -> nn.Module:
    """The LRA model for `cfg.task` / `cfg.model_name`; sizes default to the task table (`tasks.py`)
    and `config.sequence_length(cfg)`, which also fixes the S4 (DPLR) layers' length."""
    info = task_info(cfg.task)
    n_classes = info.n_classes if n_classes is None else n_classes
    vocab_size = info.vocab_size if vocab_size is None else vocab_size
    max_len = sequence_length(cfg) if max_len is None else max_len
    dual = info.two_tower if dual is None else dual
    cls = RetrievalClassifier if dual else LRAClassifier
    return cls(cfg, n_classes=n_classes, vocab_size=vocab_size, max_len=max_len, device=device, dtype=dtype)


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the configured betas and eps over `ssm.param_groups`.

    The SSM's A, B (and P) get `optim.ssm_lr`, its dt `optim.dt_lr` (None: `optim.lr`), both without
    weight decay; the others get `optim.lr` and `optim.weight_decay`, except vectors (biases,
    norm scales), which get no decay unless `optim.decay_vectors` (the public setups decay them).
    """
    from ssm import param_groups

    o = cfg.optim
    groups = param_groups(model, o.lr, o.weight_decay, ssm_lr=o.ssm_lr, dt_lr=o.dt_lr, decay_vectors=o.decay_vectors)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             weight_decay=o.weight_decay)
