"""Optimizer parameter groups: SSM parameters keep their own learning rate and no weight decay.

A parameter may carry `_optim`, a dict of optimizer settings (S4 sets
`{"lr": ssm_lr, "weight_decay": 0.0}` on A, B, P and log_dt). `param_groups` gives each distinct
`_optim` its own group; every other parameter gets the given lr, with `weight_decay` applied to
matrices (dim >= 2: linear weights, embeddings, C, D) and none on vectors (biases, norm scales).
"""
from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Groups for `torch.optim.AdamW(param_groups(model, lr, wd))`; each parameter appears once."""
    decay, no_decay, special = [], [], {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        hp = getattr(p, "_optim", None)
        if hp is not None:
            key = tuple(sorted(hp.items()))
            special.setdefault(key, []).append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    for key, params in special.items():
        groups.append({"params": params, **dict(key)})
    return groups
