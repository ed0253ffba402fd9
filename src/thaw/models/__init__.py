"""Models: the backbone registry and the classifier LightningModule."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from thaw.hardware import channels_last
from thaw.models.backbones import BACKBONES, Backbone, WeightsError, backbone_spec, create_backbone
from thaw.models.classifier import Classifier

__all__ = [
    "BACKBONES",
    "Backbone",
    "Classifier",
    "WeightsError",
    "backbone_spec",
    "build_classifier",
    "create_backbone",
]


def build_classifier(cfg: DictConfig, classes: list[str], pretrained: bool = True) -> Classifier:
    """The classifier a composed config describes; `pretrained=False` skips loading weights (for
    rebuilding from a checkpoint, whose state_dict has them all)."""
    backbone = create_backbone(cfg.model.name, cfg.model.weights if pretrained else None)
    run_config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return Classifier(
        backbone,
        classes,
        optimizer=instantiate(cfg.optimizer),
        finetune=instantiate(cfg.finetune),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        head_dropout=cfg.model.head_dropout,
        label_smoothing=cfg.model.label_smoothing,
        run_config=run_config,
        channels_last=channels_last(cfg.trainer),
        compile=cfg.model.get("compile", False),
    )
