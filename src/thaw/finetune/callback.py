"""The freeze/unfreeze callback: applies a strategy's phase to the model at every epoch start."""

from __future__ import annotations

import pytorch_lightning as pl
from torch import nn

from thaw.finetune.strategies import FinetuneStrategy
from thaw.models.backbones import HEAD
from thaw.models.layer_groups import LayerGroup


def set_trainable(group: LayerGroup, trainable: bool, bn: str) -> None:
    """Train `group`, or freeze it: requires_grad off and grads dropped (so no optimizer step,
    momentum or weight decay moves its parameters), and its modules in eval mode unless
    `bn == "train"`, in which case BatchNorm keeps training its statistics and affine weights."""
    for param in group.params:
        param.requires_grad_(trainable)
        if not trainable:
            param.grad = None
    for module in group.modules:
        if trainable or bn == "train":
            module.train()
        else:
            module.eval()
        if not trainable and bn == "train":
            for sub in module.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    for param in sub.parameters(recurse=False):
                        param.requires_grad_(True)


class FreezeUnfreeze(pl.Callback):
    """Re-applies the phase at train start and every epoch start, so a resumed run, wherever it
    stopped, trains exactly the groups an uninterrupted run would."""

    def __init__(self, strategy: FinetuneStrategy) -> None:
        self.strategy = strategy

    def apply(self, pl_module: pl.LightningModule, epoch: int) -> list[str]:
        groups: dict[str, LayerGroup] = pl_module.model.layer_groups()
        backbone = list(pl_module.model.backbone_groups)
        trainable = {HEAD, *self.strategy.trainable_groups(epoch, backbone)}
        for name, group in groups.items():
            set_trainable(group, name in trainable, self.strategy.bn)
        return [g for g in groups if g in trainable]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = self.apply(pl_module, trainer.current_epoch)
        pl_module.log("finetune/trainable_groups", float(len(trainable)), on_epoch=True)
