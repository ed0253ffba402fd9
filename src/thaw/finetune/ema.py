"""callbacks=ema: Lightning's EMAWeightAveraging, with the average kept when a checkpoint is
loaded to evaluate it."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights (`decay` as in Lightning's callback).

    A checkpoint's `state_dict` holds the average and `current_model_state` the raw weights.
    Lightning's callback loads the raw weights into the model whenever a checkpoint is loaded on
    a trainer that has fitted, so `trainer.test(ckpt_path="best")` after `fit` tested the raw
    weights while best.ckpt, export and serving carry the average. Here the raw weights are
    restored only to resume fitting, and validation swaps the weights only while fitting (outside
    it the loaded weights already are the average)."""

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
