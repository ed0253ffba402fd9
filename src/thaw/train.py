"""`python train.py ...`: compose the config, fit, test the best checkpoint, write metrics.json."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from thaw import run_dir
from thaw.build import (
    build_datamodule,
    build_run_callbacks,
    build_strategy,
    build_task,
    build_trainer,
    trainer_for_testing,
)
from thaw.config import flat_hparams
from thaw.errors import UserError
from thaw.evaluate import report_test_metrics
from thaw.finetune import FinetuneStrategy
from thaw.fit_postprocessing import calibrate, reject_unknown
from thaw.models import load_trained
from thaw.models.backbones import STAGES
from thaw.openset.extend import Extension, extend_head, old_class_accuracy
from thaw.resume import ResumeState, TrainingStopped, check_resumable, resolve_ckpt_path
from thaw.training_checks import check_training_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Train as `cfg` says and return every logged metric (val and, if tested, test).
    `callbacks` run before thaw's own (so that they can time them, as scripts/bench_speed.py
    does). Stopped by SIGTERM or Ctrl-C, it saves last.ckpt and raises TrainingStopped."""
    check_training_config(cfg)
    resume = ResumeState(started=time.perf_counter())
    output_dir = Path(cfg.paths.output_dir)
    run_dir.check_writable(output_dir, checkpoint_dirs(cfg))
    with run_dir.holding(output_dir):
        return _train(cfg, [*callbacks], resume, output_dir)


def checkpoint_dirs(cfg: DictConfig) -> list[Path]:
    """The folders the callbacks group saves checkpoints to (checkpoints/ by default)."""
    entries = (c for c in cfg.get("callbacks", {}).values() if c is not None)
    return sorted({Path(c.dirpath) for c in entries if c.get("dirpath")})


def _train(
    cfg: DictConfig, callbacks: list[pl.Callback], resume: ResumeState, output_dir: Path
) -> dict[str, Any]:
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    # Before any data is read or weights downloaded: a schedule mistake answers at once.
    strategy = build_strategy(cfg)
    log_phases(strategy, list(STAGES), cfg.trainer.get("max_epochs"))

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if ckpt_path is not None:
        check_resumable(ckpt_path, cfg.model.name, datamodule.classes)
    if datamodule.multilabel:
        monitor_map(cfg)
    task = build_task(cfg, datamodule, strategy)
    extension, old_before = None, None
    if cfg.model.head == "extend":
        extension = extend_head(task.model, cfg.model.weights, datamodule)
        if cfg.get("test"):  # only the test report shows it
            old_before = old_class_accuracy(extension.source, datamodule, extension.old)
    run_callbacks = build_run_callbacks(strategy, datamodule, task, resume)
    trainer = build_trainer(cfg, [*callbacks, *run_callbacks])

    log.info("Run dir: %s", output_dir)
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        raise TrainingStopped(resume.stopped_by or signal.SIGTERM) from None
    except SystemExit:
        if trainer.interrupted:  # a KeyboardInterrupt, which Lightning ends with exit 1
            raise TrainingStopped(signal.SIGINT) from None
        raise
    metrics = fitted_metrics(trainer) | datamodule.counts
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""

    calibration: dict[str, float] = {}
    if cfg.get("calibrate"):
        calibration = calibrate(cfg, trainer, task, datamodule, best)
        metrics.update(calibration)
    metrics.update(reject_unknown(cfg, trainer, task, datamodule, best))

    if cfg.get("test"):
        if not best:
            log.warning("No best checkpoint was saved; testing the weights as they are now.")
        tester = trainer_for_testing(cfg, trainer)
        # metrics.json also keeps what fitting ended with: a sweep's report reads it from there.
        fitted = {k: v for k, v in metrics.items() if k.startswith("val/")}
        fitted["train/epochs"] = trainer.current_epoch
        fitted.update(datamodule.counts)  # corrections made, the unlabeled pool
        if extension is not None and best:
            fitted.update(old_classes_report(extension, old_before, best, datamodule))
        metrics.update(
            report_test_metrics(
                tester,
                task,
                datamodule,
                output_dir,
                best or None,
                extra={**fitted, **calibration},
                report=cfg.get("report", True),
                wall_time_s=resume.wall_time_s(),
            )
        )
        record_in_loggers(trainer, cfg, metrics, calibration, best)
        log.info("Test metrics written to %s", output_dir / "metrics.json")
    return metrics


def old_classes_report(
    extension: Extension, before: float | None, best: str, datamodule: Any
) -> dict[str, float]:
    """The old classes' test accuracy before fine-tuning (the checkpoint's own model) and after
    (the best checkpoint), each choosing among its own classes."""
    after = old_class_accuracy(load_trained(best), datamodule, extension.old)
    log.info(
        "Accuracy on the test images of the %d old classes: %.4f before adding %s, %.4f after",
        len(extension.old),
        before,
        ", ".join(extension.new) or "no class",
        after,
    )
    return {"test/acc_old_classes_before": float(before or 0.0), "test/acc_old_classes": after}


def log_phases(strategy: FinetuneStrategy, backbone_groups: list[str], max_epochs: Any) -> None:
    """Say what will train and when, and refuse a schedule whose backbone never thaws. Runs
    bounded by steps alone (max_epochs -1 or unset) have no epoch schedule to show."""
    if not isinstance(max_epochs, int) or max_epochs < 1:
        return
    strategy.check_schedule(max_epochs, backbone_groups)
    phases = strategy.phases(max_epochs, backbone_groups)
    log.info("Phases (%d epochs): %s", max_epochs, "; ".join(map(str, phases)))


def monitor_map(cfg: DictConfig) -> None:
    """For label sets, the callbacks that pick the best epoch by val/acc (the default; for label
    sets the exact-match ratio at 0.5, which stays 0 while a model learns) pick it by val/map,
    which no threshold changes."""
    for name, callback in (cfg.get("callbacks") or {}).items():
        if callback is not None and callback.get("monitor") == "val/acc":
            callback.monitor = "val/map"
            log.info("Multi-label data: callbacks.%s monitors val/map", name)


def fitted_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    """What fitting logged. A resumed run with no epoch left to train (a requeued job that had
    finished fitting) logs nothing, so its val/acc_best comes from the checkpoint callback's
    restored best score."""
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback
    if (
        "val/acc_best" not in metrics
        and best is not None
        and best.monitor == "val/acc"
        and best.best_model_score is not None
    ):
        metrics["val/acc_best"] = float(best.best_model_score)
    return metrics


def record_in_loggers(
    trainer: pl.Trainer,
    cfg: DictConfig,
    metrics: dict[str, Any],
    calibration: dict[str, float],
    best: str,
) -> None:
    """Give every logger the run's config; TensorBoard pairs it with the final metrics in its
    HParams dashboard, the others get the calibration figures, which no training loop logged
    (the test loop logged its own), and MLflow the best checkpoint as an artifact."""
    params = flat_hparams(cfg)
    final = {k: v for k, v in metrics.items() if isinstance(v, float)}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=final)
        else:
            logger.log_hyperparams(params)
            if calibration:
                logger.log_metrics(calibration, step=trainer.global_step)
        if isinstance(logger, MLFlowLogger) and best:
            logger.experiment.log_artifact(logger.run_id, best, "checkpoints")
        logger.finalize("success")  # written after Lightning's own finalize: flush again


def optimized_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value a sweeper optimises: metric `name` of this run (None when no name is set)."""
    if not name:
        return None
    if name not in metrics:
        logged = sorted(k for k, v in metrics.items() if isinstance(v, float))
        raise UserError(
            f"optimized_metric={name!r} was not logged by this run; the logged metrics are "
            f"{logged}. Set optimized_metric to one of them"
        )
    return float(metrics[name])


def task(cfg: DictConfig) -> float | None:
    """The command line's job (thaw.cli.train): the metrics shown, the sweep's value returned."""
    try:
        metrics = run(cfg)
    except TrainingStopped as stopped:
        # Stopped, not finished (last.ckpt saved): 128 + the signal, as a shell reports it.
        raise SystemExit(128 + stopped.signum) from None
    shown = ("val/acc_best", "temperature")
    summary = {k: v for k, v in metrics.items() if k.startswith("test/") or k in shown}
    summary = {k: v for k, v in summary.items() if isinstance(v, float)}
    rank_zero_info(OmegaConf.to_yaml({"metrics": summary, "run_dir": str(cfg.paths.output_dir)}))
    return optimized_value(metrics, cfg.get("optimized_metric"))
