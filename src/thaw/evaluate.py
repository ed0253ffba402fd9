"""`python eval.py ckpt_path=...`: recompute the test metrics from a checkpoint alone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from thaw.checkpoint import CheckpointError, read_checkpoint, run_info
from thaw.config import config_dir
from thaw.hardware import instantiate_trainer
from thaw.models import build_classifier
from thaw.train import build_datamodule, test_and_report

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild data and model from the checkpoint's own config, test, write metrics.json."""
    ckpt_path = Path(cfg.ckpt_path)
    run_config, classes = run_info(read_checkpoint(ckpt_path), ckpt_path)
    train_cfg = OmegaConf.create(run_config)
    if cfg.get("data_root"):
        train_cfg.data.root = cfg.data_root

    datamodule = build_datamodule(train_cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    if datamodule.classes != classes:
        raise CheckpointError(
            f"{ckpt_path} was trained on classes {classes}, but the data now gives "
            f"{datamodule.classes}; point data_root at the data it was trained on"
        )
    model = build_classifier(train_cfg, classes, pretrained=False)
    trainer = instantiate_trainer(cfg.trainer, logger=False, callbacks=[])
    output_dir = Path(cfg.paths.output_dir)
    metrics = test_and_report(trainer, model, datamodule, output_dir, str(ckpt_path))
    log.info("Test metrics written to %s", output_dir / "metrics.json")
    return metrics


def _main(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    summary = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print(OmegaConf.to_yaml({"metrics": summary, "run_dir": str(cfg.paths.output_dir)}))


def main() -> None:
    """Console entry point (`thaw-eval`, `python eval.py`)."""
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")(_main)()
