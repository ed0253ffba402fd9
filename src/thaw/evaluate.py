"""`python eval.py ckpt_path=...`: recompute the test metrics from a checkpoint alone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from thaw.build import build_datamodule
from thaw.checkpoint import CheckpointError
from thaw.config import config_dir
from thaw.data import ImageDataModule
from thaw.hardware import channels_last, instantiate_trainer
from thaw.models import Classifier
from thaw.report import confusion_matrix_image, write_metrics
from thaw.trained import load_trained

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Load the trained model, read only its test images (from `data_root` if they moved), test
    it, and write metrics.json."""
    trained = load_trained(cfg.ckpt_path, channels_last=channels_last(cfg.trainer))
    train_cfg = OmegaConf.create(trained.config)
    if cfg.get("data_root"):
        train_cfg.data.root = cfg.data_root
    datamodule = build_datamodule(train_cfg, trained.preprocessing, test_only=True)
    datamodule.setup("test")
    if datamodule.classes != trained.classes:
        raise CheckpointError(
            f"{trained.path} was trained on classes {trained.classes}, but the data now gives "
            f"{datamodule.classes}; point data_root at the data it was trained on"
        )
    trainer = instantiate_trainer(cfg.trainer, logger=False, callbacks=[])
    output_dir = Path(cfg.paths.output_dir)
    metrics = report_test_metrics(
        trainer, trained.model, datamodule, output_dir, str(trained.path), load_checkpoint=False
    )
    log.info("Test metrics written to %s", output_dir / "metrics.json")
    return metrics


def report_test_metrics(
    trainer: pl.Trainer,
    model: Classifier,
    datamodule: ImageDataModule,
    output_dir: Path,
    checkpoint: str | None,
    load_checkpoint: bool = True,
) -> dict[str, Any]:
    """Test `model` (with the weights of `checkpoint` unless they are loaded already), then
    write metrics.json and log the confusion matrix as an image."""
    ckpt_path = checkpoint if load_checkpoint else None
    (results,) = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics: dict[str, Any] = {k: v for k, v in results.items() if "/acc_class/" not in k}
    metrics.update({"test/" + k: v for k, v in model.test_report.items()})
    metrics["checkpoint"] = checkpoint
    if not trainer.is_global_zero:
        return metrics
    write_metrics(output_dir / "metrics.json", metrics)
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.TensorBoardLogger):
            image = confusion_matrix_image(model.test_report["confusion_matrix"], model.classes)
            logger.experiment.add_image("test/confusion_matrix", image, dataformats="HWC")
            logger.experiment.flush()
    return metrics


def _main(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    summary = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print(OmegaConf.to_yaml({"metrics": summary, "run_dir": str(cfg.paths.output_dir)}))


def main() -> None:
    """Console entry point (`thaw-eval`, `python eval.py`)."""
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")(_main)()
