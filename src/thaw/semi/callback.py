"""Whether the unlabeled images helped: semi-supervision can hurt (USB: MixMatch on STL-10 with
40 labels went from 19% to 59% error), so a run compares itself with its own supervised
warm-up and says so when it fell below it."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class WarmupCheck(pl.Callback):
    """Keeps the best val/acc of the supervised warm-up (the epochs before `start_epoch`) and of
    the epochs after it, and at the end of fitting warns when the unlabeled epochs never reached
    the warm-up's best. Both are kept in checkpoints, so a resumed run compares the same."""

    def __init__(self, start_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.warmup_best: float | None = None
        self.semi_best: float | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get("val/acc")
        if trainer.sanity_checking or accuracy is None:
            return
        value = float(accuracy)
        if trainer.current_epoch < self.start_epoch:
            self.warmup_best = max(value, self.warmup_best or 0.0)
        else:
            self.semi_best = max(value, self.semi_best or 0.0)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.warmup_best is None or self.semi_best is None:
            return
        if self.semi_best < self.warmup_best:
            log.warning(
                "semi=fixmatch did not help: the best val/acc with unlabeled images, %.4f, is "
                "below %.4f of the supervised warm-up (epochs 1-%d). Compare with semi=none, or "
                "try a higher semi.threshold or more labelled images",
                self.semi_best,
                self.warmup_best,
                self.start_epoch,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_best": self.warmup_best, "semi_best": self.semi_best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warmup_best = state_dict["warmup_best"]
        self.semi_best = state_dict["semi_best"]
