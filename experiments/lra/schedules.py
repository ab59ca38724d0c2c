"""Learning-rate schedules of the LRA trainer: the multiplier on each group's lr before a step.

"cosine" (linear warmup, then half a cosine to `min_lr_frac`; S4), "rsqrt" (the LRA text tasks:
linear warmup times 1/sqrt(max(step, warmup))) and "cosine_lra" (the LRA image tasks: warmup times a
cosine over `schedule_steps` counted after warmup). The settings are the `optim` section of
`experiments.lra.config`; the task presets that choose them are in `experiments.lra.presets`.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "rsqrt", "cosine_lra")


def warmup_and_total(optim, total_steps: int) -> tuple[int, int]:
    """(warmup steps W, schedule length T) of an `OptimConfig`: `schedule_steps` or `total_steps`
    (epochs x steps per epoch, as the trainer counts them), and `warmup_steps` or `round(warmup_frac * T)`
    (the nearest whole step)."""
    T = optim.schedule_steps if optim.schedule_steps is not None else max(int(total_steps), 1)
    W = optim.warmup_steps if optim.warmup_steps is not None else int(round(optim.warmup_frac * T))
    return W, T


def lr_multiplier(optim, step: int, total_steps: int) -> float:
    """Factor on each parameter group's lr for optimizer step `step` (0 for the first step).

    With W, T = `warmup_and_total(optim, total_steps)` and t = step:
    - "cosine" (S4; `get_cosine_schedule_with_warmup` of `transformers`): t / W for t < W, then
      m + (1 - m) * (1 + cos(pi * p)) / 2 with p = min((t - W) / (T - W), 1), m = `min_lr_frac`.
    - "rsqrt" (LRA ListOps/Text/Retrieval): min(1, t / W) / sqrt(max(t, W)); the lr field is the
      constant in front, so the peak lr is lr / sqrt(W).
    - "cosine_lra" (LRA Image/Pathfinder/Path-X): min(1, t / W) * (1 + cos(pi * (q mod 1))) / 2 with
      q = max(t - W, 0) / T (T = the cycle length, counted after warmup).
    Use as `torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_multiplier, optim, total_steps=T))`.
    """
    W, T = warmup_and_total(optim, total_steps)
    t = float(step)
    if optim.schedule == "rsqrt":
        return min(1.0, t / W) / math.sqrt(max(t, W))
    if optim.schedule == "cosine_lra":
        warm = min(1.0, t / W) if W > 0 else 1.0
        q = max(t - W, 0.0) / T
        return warm * 0.5 * (1.0 + math.cos(math.pi * (q % 1.0)))
    if t < W:
        return t / W
    p = min((t - W) / max(T - W, 1), 1.0)
    m = optim.min_lr_frac
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
