"""Optimizer parameter groups by parameter kind (docs/s4.md, "Learning rates").

SSM modules tag their parameters by kind in a `param_kinds` dict on the module (name -> "A",
"B", "C", "dt", "P"; the selective layers add their own kinds). The tags live on the module, not on
the tensors, so they survive `copy.deepcopy`, `load_state_dict(..., assign=True)` and `.to()`.
`param_groups` maps kinds to settings:

- "A", "B", "P": learning rate `ssm_lr`, no weight decay;
- "dt": learning rate `dt_lr` (by default the same as `ssm_lr`), no weight decay;
- "D" (the skip of the selective layers): the global lr, never decayed;
- every other parameter (kind "C" included): the global `lr`, with `weight_decay` on matrices
  (dim >= 2: linear weights, embeddings, C, D) and none on vectors (biases, norm scales) unless
  `decay_vectors=True` (the public S4 and LRA setups decay those too).

`ssm_lr=None` / `dt_lr=None` mean the global `lr`. The defaults (`SSM_LR`, A/B/P/dt at 1e-3) are
those of the public S4 layer.
"""
from __future__ import annotations

import math

from torch import nn

SSM_LR = 1e-3
SSM_KINDS = ("A", "B", "P")          # at ssm_lr, no weight decay
DT_KINDS = ("dt",)                   # at dt_lr, no weight decay
NO_DECAY_KINDS = ("D",)              # at the global lr, never decayed (the selective layers' skip)


def param_kinds(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> kind, for every tagged parameter of `model`."""
    out = {}
    for module in model.modules():
        for name, kind in getattr(module, "param_kinds", {}).items():
            p = module._parameters.get(name)
            if p is not None:
                out[id(p)] = kind
    return out


def _check_lr(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be None (the global lr) or a finite number >= 0, got {value!r}")


def param_groups(model: nn.Module, lr: float, weight_decay: float, *, ssm_lr: float | None = SSM_LR,
                 dt_lr: float | None | str = "ssm_lr", decay_vectors: bool = False) -> list[dict]:
    """Groups for `torch.optim.AdamW(param_groups(model, lr, wd))`; each parameter appears once.

    Order: decayed plain parameters, undecayed plain parameters, then the SSM group(s) in order of
    first appearance (one group when dt_lr equals ssm_lr); every group states "lr" and
    "weight_decay". `dt_lr="ssm_lr"` (default) follows `ssm_lr`.
    """
    dt_lr = ssm_lr if isinstance(dt_lr, str) and dt_lr == "ssm_lr" else dt_lr
    _check_lr("ssm_lr", ssm_lr)
    _check_lr("dt_lr", dt_lr)
    rates = {kind: ssm_lr for kind in SSM_KINDS} | {kind: dt_lr for kind in DT_KINDS}
    kinds = param_kinds(model)
    decay, no_decay, special = [], [], {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        kind = kinds.get(id(p))
        if kind in rates:
            rate = lr if rates[kind] is None else rates[kind]
            special.setdefault(rate, []).append(p)
        elif kind in NO_DECAY_KINDS:
            no_decay.append(p)
        elif p.dim() >= 2 or decay_vectors:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    for rate, params in special.items():
        groups.append({"params": params, "lr": rate, "weight_decay": 0.0})
    return groups
