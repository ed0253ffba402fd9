"""Learning-rate schedules over the fixed parameter groups, stepped per optimizer step.

Each factory takes the optimizer and the run's length and returns Lightning's scheduler config;
the configs in conf/scheduler/ bind the rest with `_partial_: true`. `group_factors` (one per
optimizer group, from the fine-tuning strategy's thaw warmup) multiply each group's schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from thaw.errors import UserError

GroupFactors = list[Callable[[int], float]] | None


def _product(schedule: Callable[[int], float], group: Callable[[int], float], step: int) -> float:
    return schedule(step) * group(step)


def _warmed_up(
    optimizer: Optimizer,
    warmup_steps: int,
    after: Callable[[int], float],
    group_factors: GroupFactors = None,
) -> dict[str, Any]:
    """Linear warmup over `warmup_steps`, then `after(steps since warmup)` as the LR factor."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(step - warmup_steps)

    lambdas = (
        factor if group_factors is None else [partial(_product, factor, g) for g in group_factors]
    )
    return {"scheduler": LambdaLR(optimizer, lambdas), "interval": "step"}


def _no_group_factors(name: str, group_factors: GroupFactors) -> None:
    if group_factors is not None:
        raise UserError(
            f"scheduler={name} cannot combine with finetune.thaw_warmup_epochs; "
            "use scheduler=cosine, step or constant, or finetune.thaw_warmup_epochs=0"
        )


def cosine(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    min_lr_ratio: float = 0.0,
    group_factors: GroupFactors = None,
) -> dict[str, Any]:
    """Warmup, then cosine decay to `min_lr_ratio` of each group's LR at the last step."""
    warmup = round(warmup_epochs * steps_per_epoch)
    decay_steps = max(1, total_steps - warmup)

    def after(step: int) -> float:
        progress = min(step / decay_steps, 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return _warmed_up(optimizer, warmup, after, group_factors)


def step(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    step_epochs: int = 10,
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    group_factors: GroupFactors = None,
) -> dict[str, Any]:
    """Warmup, then multiply by `gamma` every `step_epochs` epochs."""
    warmup = round(warmup_epochs * steps_per_epoch)
    period = max(1, step_epochs * steps_per_epoch)
    return _warmed_up(optimizer, warmup, lambda s: gamma ** (s // period), group_factors)


def constant(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    group_factors: GroupFactors = None,
) -> dict[str, Any]:
    """Warmup, then each group's LR unchanged."""
    warmup = round(warmup_epochs * steps_per_epoch)
    return _warmed_up(optimizer, warmup, lambda s: 1.0, group_factors)


def onecycle(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    pct_start: float = 0.25,
    group_factors: GroupFactors = None,
) -> dict[str, Any]:
    """OneCycle with each group's own LR as its peak, so discriminative LRs are kept. A warm-up
    of exactly one step is refused: torch's OneCycleLR divides by zero there."""
    _no_group_factors("onecycle", group_factors)
    if pct_start * total_steps == 1:
        raise UserError(
            f"scheduler=onecycle warms up over scheduler.pct_start={pct_start} of the run's "
            f"{total_steps} steps, exactly one step, which torch's OneCycleLR cannot schedule: "
            "change scheduler.pct_start or the run's length (trainer.max_epochs, the images or "
            "data.batch_size), or use scheduler=cosine"
        )
    max_lr = [group["lr"] for group in optimizer.param_groups]
    scheduler = OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start)
    return {"scheduler": scheduler, "interval": "step"}


def plateau(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    monitor: str = "val/loss",
    factor: float = 0.1,
    patience: int = 2,
    group_factors: GroupFactors = None,
) -> dict[str, Any]:
    """Divide every group's LR by 1/`factor` when `monitor` stops improving (checked per epoch)."""
    _no_group_factors("plateau", group_factors)
    mode = "max" if monitor.endswith("acc") else "min"
    scheduler = ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience)
    return {"scheduler": scheduler, "interval": "epoch", "monitor": monitor}
