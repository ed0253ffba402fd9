"""The training loop's progress (see thaw.progress): Lightning's rich bar on a terminal, and one
log line per epoch in a file."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress import ProgressBar

from thaw.errors import UserError
from thaw.models.backbones import HEAD
from thaw.progress import duration, on_terminal

log = logging.getLogger("thaw.progress")  # one logger for every progress line


def progress_bar(every_n_steps: int = 100) -> ProgressBar:
    """The progress callback (conf/callbacks/default.yaml): the rich bar on a terminal, else
    LogProgress."""
    return RichProgressBar() if on_terminal() else LogProgress(every_n_steps)


def with_progress(callbacks: list[pl.Callback], trainer_cfg: Any) -> list[pl.Callback]:
    """`callbacks`, plus `progress_bar()` where the trainer shows progress but none of them is a
    progress bar (callbacks=none, the test trainer of a spawned DDP run, eval): Lightning would
    add its tqdm bar, which writes carriage returns into a log file."""
    if not trainer_cfg.get("enable_progress_bar", True):
        return callbacks
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return callbacks
    return [*callbacks, progress_bar()]


def epoch_of(trainer: pl.Trainer) -> str:
    """`3/10`, counting from 1; `3` for a run bounded by steps alone (max_epochs -1)."""
    epoch = trainer.current_epoch + 1
    return f"{epoch}/{trainer.max_epochs}" if (trainer.max_epochs or 0) > 0 else str(epoch)


def batch_size(batch: Any) -> int:
    """Images in a batch: the first tensor's length, in a tensor, tuple/list or dict batch."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, Sequence) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    return 0


class LogProgress(ProgressBar):
    """One line per epoch: epoch/max, step, the groups that train, train/loss, val/loss,
    val/acc, the learning rate of the head and of the lowest thawed group, images per second
    and the time left; a line every `every_n_steps` steps within an epoch; and one per test
    (eval) run. Written as the run goes, on the main process only."""

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise UserError(f"callbacks.progress.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._epoch_started = 0.0
        self._images = 0
        self._batches = 0  # this epoch's, since it (or a resumed run) started
        self._whole_epoch: bool | None = None  # False when the run resumed mid-epoch
        self._epoch_seconds: list[float] = []
        self._test_started = 0.0
        self._test_images = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def _shows(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning skips `on_train_epoch_start` for the epoch a run resumes in the middle of:
        time that epoch's part from here."""
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()
        self._images = 0
        self._batches = 0
        self._whole_epoch = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._images += batch_size(batch)
        self._batches += 1
        if self._whole_epoch is None:  # the first batch of this process's epoch
            self._whole_epoch = batch_idx == 0
        done = batch_idx + 1
        total = self.total_train_batches
        if not self._shows or done % self.every_n_steps or done == total:
            return
        elapsed = time.perf_counter() - self._epoch_started
        per_batch = elapsed / self._batches
        finite = isinstance(total, int)
        left = per_batch * (total - done) if finite else math.nan
        left += self._epochs_left(trainer) * self._epoch_estimate(per_batch * total)
        loss = trainer.callback_metrics.get("train/loss")
        log.info(
            "epoch %s step %d/%s%s | %.0f img/s | ETA %s",
            epoch_of(trainer),
            done,
            total,
            f" | train/loss {float(loss):.4f}" if loss is not None else "",
            self._images / max(elapsed, 1e-9),
            duration(left),
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._epoch_started
        if self._whole_epoch:  # a resumed epoch's time is only part of one
            self._epoch_seconds.append(seconds)
        if not self._shows:
            return
        metrics = trainer.callback_metrics
        shown = [
            f"{key} {float(metrics[key]):.4f}"
            for key in ("train/loss", "train/mask_rate", "val/loss", "val/acc")
            if key in metrics
        ]
        log.info(
            "epoch %s | step %d | trains %s | %s | %s | %.0f img/s | %s/epoch | ETA %s",
            epoch_of(trainer),
            trainer.global_step,
            ", ".join(trained_groups(trainer)) or "nothing",
            " | ".join(shown),
            learning_rates(trainer),
            self._images / max(seconds, 1e-9),
            duration(seconds),
            duration(self._epochs_left(trainer) * self._epoch_estimate(seconds)),
        )

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._test_started = time.perf_counter()
        self._test_images = 0

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._test_images += batch_size(batch)
        done = batch_idx + 1
        if self._shows and done % self.every_n_steps == 0:
            log.info("test: batch %d/%s", done, trainer.num_test_batches[dataloader_idx])

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._shows:
            return
        seconds = time.perf_counter() - self._test_started
        log.info(
            "test: %d images in %s (%.0f img/s)",
            self._test_images,
            duration(seconds),
            self._test_images / max(seconds, 1e-9),
        )

    def _epochs_left(self, trainer: pl.Trainer) -> int:
        """Epochs after this one (0 for a run bounded by steps alone, max_epochs -1)."""
        return max(0, (trainer.max_epochs or 0) - trainer.current_epoch - 1)

    def _epoch_estimate(self, this_epoch: float) -> float:
        """Seconds per epoch: the mean of the epochs done, else this one's estimate."""
        done = self._epoch_seconds
        return sum(done) / len(done) if done else this_epoch


def trained_groups(trainer: pl.Trainer) -> list[str]:
    """The layer groups with a parameter that trains now, head first, then the backbone top
    down (the optimizer holds them lowest first, head last)."""
    groups: list[str] = []
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            name = group.get("group")
            if name and name not in groups and any(p.requires_grad for p in group["params"]):
                groups.append(name)
    return groups[::-1]


def learning_rates(trainer: pl.Trainer) -> str:
    """`lr head 1.0e-03, stage2 1.0e-04`: the head's and the lowest thawed group's rate now."""
    rates: dict[str, float] = {}
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            name = group.get("group", "all")
            if any(p.requires_grad for p in group["params"]):
                rates.setdefault(name, float(group["lr"]))
    if not rates:
        return "lr -"
    names = [HEAD] if HEAD in rates else []
    lowest = next((name for name in rates if name != HEAD), None)  # groups are lowest first
    if lowest is not None:
        names.append(lowest)
    return "lr " + ", ".join(f"{name} {rates[name]:.1e}" for name in names)
