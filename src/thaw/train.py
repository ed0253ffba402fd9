"""`python train.py ...`: compose the config, fit, test the best checkpoint, write metrics.json."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from thaw.callbacks import ResumeState
from thaw.checkpoint import check_resumable
from thaw.config import config_dir, flat_hparams
from thaw.data import ImageDataModule
from thaw.finetune import FeatureCache, FreezeUnfreeze, wants_cache
from thaw.hardware import instantiate_trainer
from thaw.models import backbone_spec, build_classifier
from thaw.report import confusion_matrix_image, write_metrics

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The DataModule of `cfg.data`, normalised with the backbone's pretraining statistics."""
    spec = backbone_spec(cfg.model.name)
    return instantiate(cfg.data, augment=cfg.augment, mean=spec.mean, std=spec.std)


def build_trainer(cfg: DictConfig, extra_callbacks: list[pl.Callback]) -> pl.Trainer:
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    return instantiate_trainer(
        cfg.trainer, callbacks=callbacks + extra_callbacks, logger=loggers or False
    )


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` means this run dir's last checkpoint; anything else must be an existing file."""
    if ckpt_path is None:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: {path} does not exist")
    return str(path)


def test_trainer(cfg: DictConfig, trainer: pl.Trainer) -> pl.Trainer:
    """The fit trainer, except after spawned DDP workers: their test report would stay in the
    workers, so test on one device here. Either way each test process sees every test image
    once (the test loader is not sharded) and computes the metrics alone."""
    if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        return trainer
    return instantiate_trainer(
        cfg.trainer, devices=1, strategy="auto", callbacks=[], logger=trainer.loggers or False
    )


def test_and_report(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    output_dir: Path,
    ckpt_path: str | None,
) -> dict[str, Any]:
    """Test, then write metrics.json and log the confusion matrix as an image."""
    (results,) = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics: dict[str, Any] = {k: v for k, v in results.items() if "/acc_class/" not in k}
    metrics.update({"test/" + k: v for k, v in model.test_report.items()})
    metrics["checkpoint"] = ckpt_path
    if not trainer.is_global_zero:
        return metrics
    write_metrics(output_dir / "metrics.json", metrics)
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.TensorBoardLogger):
            image = confusion_matrix_image(model.test_report["confusion_matrix"], model.classes)
            logger.experiment.add_image("test/confusion_matrix", image, dataformats="HWC")
            logger.experiment.flush()
    return metrics


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Train as `cfg` says and return every logged metric (val and, if tested, test).
    `callbacks` run before thaw's own (so that they can time them, as scripts/bench_speed.py
    does)."""
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if ckpt_path is not None:
        check_resumable(ckpt_path, cfg.model.name, datamodule.classes)
    model = build_classifier(cfg, datamodule.classes)
    own = [*callbacks, FreezeUnfreeze(model.finetune), ResumeState()]
    if wants_cache(model.finetune, datamodule.augment, list(model.backbone_groups)):
        own.append(FeatureCache(model.finetune))
    trainer = build_trainer(cfg, own)

    log.info("Run dir: %s", output_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint was saved; testing the weights as they are now.")
        metrics.update(
            test_and_report(test_trainer(cfg, trainer), model, datamodule, output_dir, best or None)
        )
        hparam_metrics = {k: v for k, v in metrics.items() if isinstance(v, float)}
        for logger in trainer.loggers:
            logger.log_hyperparams(flat_hparams(cfg), metrics=hparam_metrics)
            logger.finalize("success")  # written after Lightning's own finalize: flush again
        log.info("Test metrics written to %s", output_dir / "metrics.json")
    return metrics


def _main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except SIGTERMException:
        # Terminated, not finished (ResumeState saved last.ckpt): 128 + SIGTERM, as a shell says.
        raise SystemExit(143) from None
    summary = {k: v for k, v in metrics.items() if k.startswith("test/") or k == "val/acc_best"}
    summary = {k: v for k, v in summary.items() if isinstance(v, float)}
    rank_zero_info(OmegaConf.to_yaml({"metrics": summary, "run_dir": str(cfg.paths.output_dir)}))
    value = metrics.get(cfg.get("optimized_metric") or "")
    return None if value is None else float(value)


def main() -> None:
    """Console entry point (`thaw-train`, `python train.py`)."""
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(_main)()
