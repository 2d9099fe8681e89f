"""Learning-rate schedules: constant, step and cosine, each with an optional linear warmup."""

from __future__ import annotations

import math

from gradserve_services.optim.config import OptimizerConfig

__all__ = ["learning_rate"]


def learning_rate(config: OptimizerConfig, update_index: int) -> float:
    """The learning rate of the update with 0-based index `update_index`.

    Warmup ramps linearly from lr/warmup to lr over the first `warmup_steps` updates; the schedule
    proper counts updates after warmup (step: times gamma every `step_size`; cosine: from lr down to
    `min_lr` over `total_steps - warmup_steps`, then stays at `min_lr`).
    """
    schedule = config.schedule
    base = config.lr
    if update_index < schedule.warmup_steps:
        return base * (update_index + 1) / schedule.warmup_steps
    after_warmup = update_index - schedule.warmup_steps
    if schedule.name == "step":
        return base * schedule.gamma ** (after_warmup // schedule.step_size)
    if schedule.name == "cosine":
        span = max(schedule.total_steps - schedule.warmup_steps, 1)
        progress = min(after_warmup / span, 1.0)
        return schedule.min_lr + (base - schedule.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base
