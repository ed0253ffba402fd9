"""The freeze/unfreeze callback: applies a strategy's phase to the model at every epoch start."""

from __future__ import annotations

import pytorch_lightning as pl
from torch import nn

from thaw.finetune.strategies import FinetuneStrategy
from thaw.models.backbones import HEAD


def set_trainable(modules: list[nn.Module], trainable: bool, bn: str) -> None:
    """Train `modules`, or freeze them: requires_grad off and grads dropped (so no optimizer step,
    momentum or weight decay moves them), and in eval mode unless `bn == "train"`, in which case
    BatchNorm keeps training its statistics and affine weights."""
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(trainable)
            if not trainable:
                param.grad = None
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
        groups: dict[str, list[nn.Module]] = pl_module.layer_groups()
        backbone = list(pl_module.backbone_groups)
        trainable = {HEAD, *self.strategy.trainable_groups(epoch, backbone)}
        for name, modules in groups.items():
            set_trainable(modules, name in trainable, self.strategy.bn)
        return [g for g in groups if g in trainable]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = self.apply(pl_module, trainer.current_epoch)
        pl_module.log("finetune/trainable_groups", float(len(trainable)), on_epoch=True)
