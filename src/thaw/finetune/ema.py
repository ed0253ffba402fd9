"""callbacks=ema: Lightning's EMAWeightAveraging, with the average kept when a checkpoint is
loaded to evaluate it."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn

from thaw.errors import UserError

log = logging.getLogger(__name__)

# The average spans about 1 / (1 - decay) steps. Spanning more than this share of the steps it
# averages, it keeps the early weights (measured on short runs in results/ema_short/).
MAX_SPAN_SHARE = 0.25


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights (`decay` as in Lightning's callback).

    A checkpoint's `state_dict` holds the average and `current_model_state` the raw weights.
    Lightning's callback loads the raw weights into the model whenever a checkpoint is loaded on
    a trainer that has fitted, so `trainer.test(ckpt_path="best")` after `fit` tested the raw
    weights while best.ckpt, export and serving carry the average. Here the raw weights are
    restored only to resume fitting, and validation swaps the weights only while fitting (outside
    it the loaded weights already are the average)."""

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        if not 0 < decay < 1:
            raise UserError(
                f"decay must be between 0 and 1, got {decay}: each step the average keeps that "
                "share of itself (0.999 spans about 1,000 steps)"
            )
        super().__init__(decay=decay, **kwargs)
        self.decay = decay

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn, naming a decay that fits, when the average would span too much of the run."""
        steps = trainer.estimated_stepping_batches - (self.update_starting_at_step or 0)
        span = round(1 / (1 - self.decay), 6)  # 0.9 spans 10 steps, not 10.000000000000002
        if math.isfinite(steps) and span > MAX_SPAN_SHARE * steps:
            fits = max(0.5, 1 - 1 / (MAX_SPAN_SHARE * steps))
            log.warning(
                "callbacks.ema.decay=%s averages over about %.0f steps, but this run averages %d: "
                "the average will stay near the early weights. Set callbacks.ema.decay=%.3f or "
                "less (about a quarter of the run).",
                self.decay,
                span,
                steps,
                math.floor(fits * 1000) / 1000,
            )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_end(trainer, pl_module)
