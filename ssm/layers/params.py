"""Optimizer parameter groups: SSM parameters keep their own learning rate and no weight decay.

A parameter may carry `_optim`, a dict of optimizer settings (S4 sets
`{"lr": ssm_lr, "weight_decay": 0.0}` on A, B and P and `{"lr": dt_lr, "weight_decay": 0.0}` on
log_dt; docs/s4.md, "Learning rates"). A setting it leaves out takes the default below: a missing
"lr" means the global `lr` given to `param_groups` (S4 with `ssm_lr=None` / `dt_lr=None`), a
missing "weight_decay" the rule for plain parameters. `param_groups` gives each distinct `_optim`
its own group; every other parameter gets the given lr, with `weight_decay` applied to matrices
(dim >= 2: linear weights, embeddings, C, D) and none on vectors (biases, norm scales).
"""
from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, *, decay_vectors: bool = False) -> list[dict]:
    """Groups for `torch.optim.AdamW(param_groups(model, lr, wd))`; each parameter appears once.

    Order: decayed plain parameters, undecayed plain parameters, then one group per distinct
    `_optim` setting in order of first appearance; every group states its "lr" and "weight_decay".
    `decay_vectors=True` also decays the untagged vectors (biases, norm scales), as the public S4
    and LRA setups do.
    """
    decay, no_decay, special = [], [], {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        hp = getattr(p, "_optim", None)
        if hp is not None:
            settings = {"lr": lr, "weight_decay": weight_decay if p.dim() >= 2 else 0.0, **hp}
            key = tuple(sorted(settings.items()))
            special.setdefault(key, []).append(p)
        elif p.dim() >= 2 or decay_vectors:
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
