"""Fitting the post-processing record after training, on the validation split, into the best
checkpoint (thaw.postprocess): temperature scaling, one scalar T that makes softmax(logits / T)
mean what it says (Guo et al., 2017), and accuracy does not change; then the rejection rule that
says "none of these" (thaw.openset). A multi-label model gets its per-label thresholds instead
(thaw.analysis.thresholds). Predict, export and serve apply them all.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from itertools import islice
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from thaw.analysis.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from thaw.analysis.thresholds import UNTUNED, f1_macro, tune_thresholds
from thaw.checkpoint import update_run_record
from thaw.data.datamodule import ImageDataModule
from thaw.hardware import channels_last
from thaw.models import load_trained
from thaw.models.task import ClassificationTask
from thaw.openset.fit import RejectSettings, fit_rejection, store_rejection
from thaw.postprocess import Postprocessing

T = TypeVar("T")

log = logging.getLogger(__name__)


def calibrate(
    cfg: DictConfig,
    trainer: pl.Trainer,
    task: ClassificationTask,
    datamodule: ImageDataModule,
    best: str,
) -> dict[str, float]:
    """Temperature scaling after training: fit T on the best checkpoint's validation logits,
    write it into that checkpoint's postprocessing (atomically) and into the task's model's, so
    the test that follows and everything that loads the checkpoint apply it. Returns the figures
    for the run's metrics: `temperature`, and the validation NLL and ECE before (`val/nll`,
    `val/ece`) and after it (`val/nll_calibrated`, `val/ece_calibrated`); {} (nothing changed)
    without a best checkpoint or validation images.

    Global rank 0 fits and writes; the other ranks (DDP) receive T from it."""
    if not best:
        log.info("No best checkpoint was saved: no temperature fitted")
        return {}
    n_batches = _validation_batches(trainer, datamodule)
    if n_batches == 0:
        log.info("No validation images: no temperature fitted")
        return {}
    device = trainer.strategy.root_device
    if task.multilabel:
        return tune_label_thresholds(cfg, trainer, task, datamodule, best, n_batches)
    figures = on_global_zero(
        trainer,
        "fitting the temperature",
        lambda: fit_checkpoint_temperature(
            best, datamodule, n_batches, device, channels_last(cfg.trainer)
        ),
    )
    task.model.postprocessing = Postprocessing(figures["temperature"])
    images = int(figures.pop("images"))
    warn_at_the_range_end(figures["temperature"])
    log.info(
        "Temperature %.4f fitted on %d validation images: NLL %.4f -> %.4f, ECE %.4f -> %.4f "
        "(written into %s)",
        figures["temperature"],
        images,
        figures["val/nll"],
        figures["val/nll_calibrated"],
        figures["val/ece"],
        figures["val/ece_calibrated"],
        best,
    )
    return figures


def tune_label_thresholds(
    cfg: DictConfig,
    trainer: pl.Trainer,
    task: ClassificationTask,
    datamodule: ImageDataModule,
    best: str,
    n_batches: int,
) -> dict[str, float]:
    """A multi-label model's calibration: each label's F1-best threshold on the validation
    images (thaw.analysis.thresholds), into the best checkpoint and the task's model, as
    `calibrate` does for a temperature. Returns the validation F1 macro at 0.5
    (`val/f1_macro_at_0.5`) and at the tuned thresholds (`val/f1_macro_tuned`)."""
    device = trainer.strategy.root_device

    def fit() -> dict[str, Any]:
        network = load_trained(best, channels_last=channels_last(cfg.trainer)).to(device)
        probabilities, labels = validation_outputs(network, datamodule, n_batches, device)
        thresholds = tune_thresholds(probabilities, labels)
        record = dataclasses.replace(network.postprocessing, thresholds=tuple(thresholds))
        update_run_record(best, postprocessing=record.to_dict())
        return {
            "thresholds": thresholds,
            "val/f1_macro_at_0.5": f1_macro(probabilities, labels, [UNTUNED] * len(thresholds)),
            "val/f1_macro_tuned": f1_macro(probabilities, labels, thresholds),
            "images": len(labels),
        }

    figures = on_global_zero(trainer, "tuning the label thresholds", fit)
    thresholds = figures.pop("thresholds")
    postprocessing = task.model.postprocessing
    task.model.postprocessing = dataclasses.replace(postprocessing, thresholds=tuple(thresholds))
    log.info(
        "Label thresholds tuned on %d validation images for each label's F1 (F1 macro %.4f at "
        "0.5 -> %.4f), written into %s: %s",
        figures.pop("images"),
        figures["val/f1_macro_at_0.5"],
        figures["val/f1_macro_tuned"],
        best,
        ", ".join(f"{c} {t:.3f}" for c, t in zip(task.model.classes, thresholds, strict=True)),
    )
    return figures


@torch.inference_mode()
def validation_outputs(
    network: torch.nn.Module, datamodule: ImageDataModule, n_batches: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities (its Postprocessing's) and labels of the first `n_batches` validation
    batches, on the CPU."""
    network.eval()
    outputs, targets = [], []
    for images, labels in islice(datamodule.val_dataloader(), n_batches):
        logits = network(images.to(device)).float().cpu()
        outputs.append(network.postprocessing.probabilities(logits))
        targets.append(labels.cpu())
    return torch.cat(outputs), torch.cat(targets)


def reject_unknown(
    cfg: DictConfig,
    trainer: pl.Trainer,
    task: ClassificationTask,
    datamodule: ImageDataModule,
    best: str,
) -> dict[str, float]:
    """Fit the rejection rule (thaw.openset, the `reject` group) of the best checkpoint, after
    its temperature, and write it into the checkpoint and the task's model, as `calibrate`
    does; returns `reject/threshold`, or {} where no rule is fitted (`reject.score=null`, no
    best checkpoint or no validation images)."""
    settings = RejectSettings.of(cfg.reject)
    n_batches = _validation_batches(trainer, datamodule)
    if task.multilabel:
        log.info("No rejection rule fitted: a multi-label model's answer may be no label at all")
        return {}
    if settings.score is None or not best or n_batches == 0:
        why = "reject.score=null" if settings.score is None else "no best checkpoint or val images"
        log.info("No rejection rule fitted (%s): every image gets a known class", why)
        return {}
    device = trainer.strategy.root_device

    def fit() -> None:
        network = load_trained(best, channels_last=channels_last(cfg.trainer)).to(device)
        store_rejection(best, *fit_rejection(network, datamodule, settings, n_batches, device))

    on_global_zero(trainer, "fitting the rejection rule", fit)
    trained = load_trained(best)  # every rank: the rule as the checkpoint now holds it
    task.model.postprocessing = trained.postprocessing
    task.model.rejection = trained.rejection.to(task.device)
    return {"reject/threshold": trained.postprocessing.rejection.threshold}


def on_global_zero(trainer: pl.Trainer, what: str, work: Callable[[], T]) -> T:
    """`work()` on global rank 0, its result broadcast to the other ranks (DDP), which never
    wait for a result that does not come: an error there is raised on every rank."""
    result: T | str | None = None
    if trainer.is_global_zero:
        try:
            result = work()
        except Exception as err:
            trainer.strategy.broadcast(f"{type(err).__name__}: {err}", src=0)
            raise
    result = trainer.strategy.broadcast(result, src=0)
    if isinstance(result, str):
        raise RuntimeError(f"{what} failed on global rank 0: {result}")
    return result  # type: ignore[return-value]


def warn_at_the_range_end(temperature: float) -> None:
    """A fitted temperature at an end of the searched range is no fit: say why, and what helps."""
    if MIN_TEMPERATURE * 1.001 < temperature < MAX_TEMPERATURE * 0.999:
        return
    log.warning(
        "The fitted temperature %.4g is at the end of the searched range [%g, %g]: the "
        "validation NLL kept falling towards it, as it does when the model gets every "
        "validation image right (the low end) or guesses no better than chance (the high "
        "end). More validation images give a better fit (data.val_fraction); "
        "calibrate=false keeps the model's own probabilities",
        temperature,
        MIN_TEMPERATURE,
        MAX_TEMPERATURE,
    )


def fit_checkpoint_temperature(
    checkpoint: str,
    datamodule: ImageDataModule,
    n_batches: int,
    device: torch.device,
    channels_last: bool = False,
) -> dict[str, float]:
    """Fit the temperature of `checkpoint` on the first `n_batches` validation batches of
    `datamodule` (in eval mode, on `device`) and store it in the checkpoint; `calibrate`'s
    figures, and the number of `images` it was fitted on."""
    network = load_trained(checkpoint, channels_last=channels_last).to(device)
    logits, labels = [], []
    with torch.inference_mode():
        for images, targets in islice(datamodule.val_dataloader(), n_batches):
            logits.append(network(images.to(device)).float().cpu())
            labels.append(targets.cpu())
    del network
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    temperature = fit_temperature(all_logits, all_labels)
    update_run_record(checkpoint, postprocessing=Postprocessing(temperature).to_dict())
    return {
        "temperature": temperature,
        "val/nll": negative_log_likelihood(all_logits, all_labels),
        "val/nll_calibrated": negative_log_likelihood(all_logits, all_labels, temperature),
        "val/ece": expected_calibration_error(all_logits.softmax(-1), all_labels),
        "val/ece_calibrated": expected_calibration_error(
            (all_logits / temperature).softmax(-1), all_labels
        ),
        "images": float(len(all_labels)),
    }


def _validation_batches(trainer: pl.Trainer, datamodule: ImageDataModule) -> int:
    """How many validation batches the trainer's validation saw (`trainer.limit_val_batches`
    applied as Lightning applies it): the batches the temperature is fitted on."""
    if datamodule.val_set is None or len(datamodule.val_set) == 0:
        return 0
    total = -(-len(datamodule.val_set) // datamodule.eval_batch_size)
    limit = trainer.limit_val_batches
    if isinstance(limit, int):
        return min(total, limit)
    return total if limit >= 1.0 else int(total * limit) or int(limit > 0)
