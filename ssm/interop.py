"""Causal language models of Mamba / Mamba-2 layers and converters to and from `transformers`.

`MambaLM`: token embedding, n residual blocks `h = h + mixer(RMSNorm(h))` with mixer a
`ssm.Mamba` or `ssm.Mamba2`, a final RMSNorm and a decoder tied to the embedding (the layout of
the public Mamba language models). `from_transformers(model)` builds one from a
`transformers` `MambaForCausalLM` / `Mamba2ForCausalLM` with the same weights;
`to_transformers_state_dict(lm)` writes the weights back in that model's key names. Parameter
names of the mixers are the public ones, so only the prefixes change. `transformers` is imported
by neither function: they read the model's config attributes and state_dict.
"""
from __future__ import annotations

import torch
from torch import nn

from ssm.layers.mamba import Mamba, check_int
from ssm.layers.mamba2 import Mamba2
from ssm.layers.nn import keyword_only

MIXERS = {"mamba": Mamba, "mamba2": Mamba2}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in float32 (or wider)."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class ResidualMixer(nn.Module):
    """h + mixer(RMSNorm(h)); state and step are the mixer's."""

    def __init__(self, mixer: nn.Module, eps: float, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(mixer.d_model, eps, device=device, dtype=dtype)
        self.mixer = mixer

    def forward(self, h, state=None):
        y, state = self.mixer(self.norm(h), state=state)
        return h + y, state

    def step(self, h, state):
        y, state = self.mixer.step(self.norm(h), state)
        return h + y, state


class MambaLM(nn.Module):
    """Causal LM: ids (B, L) -> logits (B, L, vocab_size). `layer` "mamba" or "mamba2"; `layer_options`
    are the mixer's settings (fields of `MambaConfig` / `Mamba2Config`)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, *, layer: str = "mamba",
                 layer_options: dict | None = None, norm_eps: float = 1e-5, tie_embeddings: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_int("vocab_size", vocab_size)
        check_int("n_layers", n_layers)
        if layer not in MIXERS:
            raise ValueError(f"layer must be one of {tuple(MIXERS)}, got {layer!r}")
        fk = dict(device=device, dtype=dtype)
        self.layer, self.vocab_size = layer, vocab_size
        self.embedding = nn.Embedding(vocab_size, d_model, **fk)
        self.layers = nn.ModuleList(ResidualMixer(MIXERS[layer](d_model, **(layer_options or {}), **fk), norm_eps, **fk)
                                    for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model, norm_eps, **fk)
        self.lm_head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False, **fk)

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return self.norm_f(h) @ weight.T                               # (..., vocab)

    def _check_ids(self, ids: torch.Tensor, rank: int) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != rank or ids.is_floating_point():
            want = "(B, L)" if rank == 2 else "(B,)"
            raise ValueError(f"ids must be an integer tensor of shape {want}, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")

    def _check_states(self, state) -> list:
        if not isinstance(state, (list, tuple)) or len(state) != len(self.layers):
            raise ValueError(f"state must be a list of {len(self.layers)} layer states (see default_state)")
        return list(state)

    @keyword_only("state")
    def forward(self, ids: torch.Tensor, *, state: list | None = None):
        """ids (B, L) -> (logits (B, L, vocab_size), next_state or None)."""
        self._check_ids(ids, 2)
        states = [None] * len(self.layers) if state is None else self._check_states(state)
        h, out = self.embedding(ids), []                               # (B, L, d_model)
        for block, s in zip(self.layers, states):
            h, s = block(h, state=s)
            out.append(s)
        return self._decode(h), (out if state is not None else None)

    def default_state(self, batch_size: int, device=None) -> list:
        return [block.mixer.default_state(batch_size, device=device) for block in self.layers]

    def step(self, ids_t: torch.Tensor, state: list):
        """One token per row: ids_t (B,) -> (logits (B, vocab_size), new state)."""
        self._check_ids(ids_t, 1)
        h, out = self.embedding(ids_t), []                             # (B, d_model)
        for block, s in zip(self.layers, self._check_states(state)):
            h, s = block.step(h, s)
            out.append(s)
        return self._decode(h), out

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, n_new: int) -> torch.Tensor:
        """Greedy continuation: ids (B, L) -> (B, L + n_new); the prompt runs in one forward."""
        check_int("n_new", n_new, 0)
        logits, state = self(ids, state=self.default_state(ids.shape[0], ids.device))
        out = [ids]
        for _ in range(n_new):
            nxt = logits[:, -1].argmax(-1) if logits.dim() == 3 else logits.argmax(-1)   # (B,)
            out.append(nxt[:, None])
            logits, state = self.step(nxt, state)
        return torch.cat(out, 1)


def _layer_options(cfg, kind: str) -> dict:
    common = dict(d_state=cfg.state_size, d_conv=cfg.conv_kernel, expand=cfg.expand, bias=cfg.use_bias,
                  conv_bias=cfg.use_conv_bias)
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"only hidden_act='silu' is supported, got {cfg.hidden_act!r}")
    if kind == "mamba":
        return {**common, "dt_rank": int(cfg.time_step_rank)}
    if cfg.num_heads * cfg.head_dim != cfg.expand * cfg.hidden_size:
        raise ValueError(f"num_heads * head_dim must equal expand * hidden_size, got {cfg.num_heads} * "
                         f"{cfg.head_dim} != {cfg.expand} * {cfg.hidden_size}")
    return {**common, "headdim": cfg.head_dim, "ngroups": cfg.n_groups, "chunk_size": cfg.chunk_size,
            "dt_limit": tuple(cfg.time_step_limit), "norm_eps": cfg.layer_norm_epsilon}


def from_transformers(model: nn.Module, *, backend: str = "auto") -> MambaLM:
    """A `MambaLM` with the weights of a `transformers` Mamba/Mamba-2 causal LM (same device, dtype)."""
    cfg = getattr(model, "config", None)
    kind = {"mamba": "mamba", "mamba2": "mamba2"}.get(getattr(cfg, "model_type", None))
    if kind is None:
        raise ValueError(f"model must be a transformers MambaForCausalLM or Mamba2ForCausalLM, got "
                         f"{type(model).__name__} (model_type {getattr(cfg, 'model_type', None)!r})")
    sd = model.state_dict()
    weight = sd["backbone.embeddings.weight"]
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    lm = MambaLM(cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, layer=kind,
                 layer_options={**_layer_options(cfg, kind), "backend": backend}, norm_eps=cfg.layer_norm_epsilon,
                 tie_embeddings=tied, device=weight.device, dtype=weight.dtype)
    ours = {}
    for key, value in sd.items():
        if key == "lm_head.weight":
            if not tied:
                ours["lm_head.weight"] = value
            continue
        ours[key.removeprefix("backbone.").replace("embeddings.", "embedding.", 1)] = value
    lm.load_state_dict(ours, strict=True)
    return lm


def to_transformers_state_dict(lm: MambaLM) -> dict:
    """`lm`'s weights under the key names of the `transformers` causal LM (lm_head included)."""
    out = {}
    for key, value in lm.state_dict().items():
        if key.startswith("lm_head."):
            out[key] = value
        else:
            out["backbone." + key.replace("embedding.", "embeddings.", 1)] = value
    if lm.lm_head is None:
        out["lm_head.weight"] = lm.embedding.weight.detach()
    return out


__all__ = ["MambaLM", "RMSNorm", "from_transformers", "to_transformers_state_dict"]
