"""Train the head on backbone features computed once, while the backbone is a fixed function.

A frozen backbone in eval mode maps an image to the same features every epoch. When the training
transform is deterministic too, the features of the training and validation sets can be computed
once and the head trained on them: the linear probe, or phase 1 of two_phase, then costs one
forward pass over the data plus a few cheap head epochs. The loaders serve the cached rows in the
order they would serve the images, so the head sees the same batches and ends up the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from thaw.data.augment.options import AugmentOptions
from thaw.data.resumable import PositionedLoader
from thaw.errors import UserError
from thaw.finetune.strategies import FinetuneStrategy

log = logging.getLogger(__name__)


def cache_blockers(
    strategy: FinetuneStrategy,
    augment: AugmentOptions,
    backbone_groups: list[str],
    blockers: Sequence[str] = (),
) -> list[str]:
    """Why the frozen backbone's features cannot be cached (empty: they can): `blockers`, what
    else in the run needs the images (distillation, semi-supervision), then the strategy's and
    the augmentation's reasons."""
    reasons = list(blockers)
    if strategy.trainable_groups(0, backbone_groups):
        reasons.append("the backbone trains from the first epoch (no frozen phase)")
    if strategy.bn != "eval":
        reasons.append("finetune.bn=train keeps frozen BatchNorm statistics moving")
    if augment.random_keys:
        reasons.append(
            f"the training images are augmented ({', '.join(augment.random_keys)}): "
            "use augment=none"
        )
    return reasons


def wants_cache(
    strategy: FinetuneStrategy,
    augment: AugmentOptions,
    backbone_groups: list[str],
    blockers: Sequence[str] = (),
) -> bool:
    """Resolve `finetune.cache_features`: true must be possible, auto is where possible."""
    if strategy.cache_features is False:
        return False
    reasons = cache_blockers(strategy, augment, backbone_groups, blockers)
    if reasons and strategy.cache_features is True:
        raise UserError(
            "finetune.cache_features=true, but features cannot be cached: " + "; ".join(reasons)
        )
    if reasons:
        log.info("Not caching backbone features: %s", "; ".join(reasons))
    return not reasons


class FeatureCache(pl.Callback):
    """At the start of every epoch in which no backbone group trains, makes the training and
    validation loaders serve cached features (each split computed the first time it is
    served); at the first epoch that trains the backbone, and at the end of training, they serve
    images again."""

    def __init__(self, strategy: FinetuneStrategy) -> None:
        self.strategy = strategy
        self.features: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run resumed mid-epoch gets no epoch-start hook for that epoch."""
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        backbone = list(pl_module.model.backbone_groups)
        frozen = not self.strategy.trainable_groups(trainer.current_epoch, backbone)
        if not frozen:
            self.features = {}  # the backbone trains: the features go stale
        for split, loader in self._loaders(trainer).items():
            loader.cached = self._features(trainer, pl_module, split) if frozen else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for loader in self._loaders(trainer).values():
            loader.cached = None

    @staticmethod
    def _loaders(trainer: pl.Trainer) -> dict[str, PositionedLoader]:
        """The loaders Lightning holds now, that have batches. The val loader may appear only at
        the first validation (no sanity check, check_val_every_n_epoch > 1): until then there is
        nothing to serve it."""
        val = trainer.val_dataloaders
        loaders = {
            "train": trainer.train_dataloader,
            "val": val[0] if isinstance(val, list) else val,
        }
        return {split: loader for split, loader in loaders.items() if loader and len(loader)}

    def _features(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str
    ) -> torch.Tensor:
        if split not in self.features:
            self.features[split] = self._compute(trainer, pl_module, split)
        return self.features[split]

    @staticmethod
    @torch.no_grad()
    def _compute(trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> torch.Tensor:
        """The backbone's features of every `split` image, in order, as the frozen backbone
        computes them in training (same modes, same precision)."""
        rows = []
        with trainer.precision_plugin.forward_context():
            for images, _ in trainer.datamodule.plain_loader(split):
                rows.append(pl_module.model.features(images.to(pl_module.device)))
        features = torch.cat(rows)
        log.info("Cached %s backbone features of the %s set", tuple(features.shape), split)
        return features
