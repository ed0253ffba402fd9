"""Fine-tuning strategies: which backbone groups train in which epoch, and their learning rates.

The phase is a pure function of the epoch, so a run resumed anywhere recomputes the same state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from thaw.errors import UserError
from thaw.finetune.param_groups import build_param_groups, discriminative_lrs, layer_decay_lrs
from thaw.models.layer_groups import LayerGroup

BN_MODES = ("eval", "train")


@dataclass(frozen=True)
class Phase:
    """Epochs `first`..`last` (0-based, inclusive) train the head and these backbone groups."""

    first: int
    last: int
    groups: list[str]

    def __str__(self) -> str:
        """`epochs 2-10: head, stage4, stage3`, counting epochs from 1 as the progress does."""
        first, last = self.first + 1, self.last + 1
        epochs = f"epoch {first}" if first == last else f"epochs {first}-{last}"
        trained = ", ".join(["head", *reversed(self.groups)])
        return f"{epochs}: {trained}"


@dataclass(kw_only=True)
class FinetuneStrategy(ABC):
    """What every strategy shares.

    bn: how BatchNorm layers of frozen groups behave: `eval` keeps their running statistics and
        affine weights fixed; `train` keeps them training (statistics and affine weights), as
        fastai does.
    backbone_lr_ratio: the lowest backbone group's learning rate as a fraction of the head's;
        the groups between are spaced geometrically.
    group_lrs: explicit learning rates for named groups (e.g. {stage4: 1e-4}), overriding spacing.
    layer_decay: per-block learning rates instead of per-group spacing, as BEiT and MAE fine-tune:
        the backbone's top block at `lr * layer_decay`, each block below one more factor (None:
        off). Finer than the four groups for timm models (their group_matcher's blocks); a
        torchvision backbone has one block per group.
    thaw_warmup_epochs: a backbone group's LR ramps up linearly over this many epochs after it
        thaws (0: no ramp), so fresh gradients do not wreck pretrained weights.
    cache_features: while the whole backbone is frozen, train and validate the head on backbone
        features computed once (true; an error where they cannot be), or where they can be
        ("auto"), or never (false). See thaw.finetune.feature_cache.
    """

    bn: str = "eval"
    backbone_lr_ratio: float = 0.1
    group_lrs: dict[str, float] | None = None
    layer_decay: float | None = None
    thaw_warmup_epochs: float = 0.0
    cache_features: bool | str = False

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise UserError(f"finetune.bn={self.bn!r} is not one of {list(BN_MODES)}")
        if not 0 < self.backbone_lr_ratio <= 1:
            raise UserError(
                f"finetune.backbone_lr_ratio={self.backbone_lr_ratio} must be in (0, 1]"
            )
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UserError(
                f"finetune.layer_decay={self.layer_decay} must be in (0, 1], or null for off"
            )
        if not isinstance(self.cache_features, bool) and self.cache_features != "auto":
            raise UserError(
                f"finetune.cache_features={self.cache_features!r} must be true, false or auto"
            )
        if self.thaw_warmup_epochs < 0:
            raise UserError(f"finetune.thaw_warmup_epochs={self.thaw_warmup_epochs} must be >= 0")

    @abstractmethod
    def trainable_groups(self, epoch: int, backbone_groups: list[str]) -> list[str]:
        """The backbone groups (ordered lowest first) that train during `epoch`."""

    def phases(self, max_epochs: int, backbone_groups: list[str]) -> list[Phase]:
        """The schedule of a run of `max_epochs`: each run of epochs training the same groups."""
        phases: list[Phase] = []
        for epoch in range(max_epochs):
            groups = self.trainable_groups(epoch, backbone_groups)
            if phases and phases[-1].groups == groups:
                phases[-1] = Phase(phases[-1].first, epoch, groups)
            else:
                phases.append(Phase(epoch, epoch, groups))
        return phases

    def check_schedule(self, max_epochs: int, backbone_groups: list[str]) -> None:
        """A ValueError where the backbone would never train within `max_epochs` (the run
        would quietly be a linear probe)."""
        if any(phase.groups for phase in self.phases(max_epochs, backbone_groups)):
            return
        freeze = getattr(self, "freeze_epochs", None)
        raise UserError(
            f"finetune.freeze_epochs={freeze} with trainer.max_epochs={max_epochs}: the backbone "
            f"never thaws, only the head trains. Set trainer.max_epochs above {freeze}, lower "
            "finetune.freeze_epochs, or choose finetune=linear_probe to train the head alone"
        )

    def param_groups(
        self, layer_groups: Mapping[str, LayerGroup], lr: float, weight_decay: float
    ) -> list[dict]:
        """The optimizer's parameter groups for `layer_groups` (lowest first, head last): every
        group from the start, each at its discriminative learning rate (head: `lr`), or each
        block at its layer-decayed one."""
        if self.layer_decay is None:
            lrs = discriminative_lrs(list(layer_groups), lr, self.backbone_lr_ratio, self.group_lrs)
        else:
            counts = {name: len(group.blocks) for name, group in layer_groups.items()}
            lrs = layer_decay_lrs(counts, lr, self.layer_decay, self.group_lrs)
        return build_param_groups(layer_groups, lrs, weight_decay)

    def thaw_warmup(
        self, names: list[str], backbone_groups: list[str], steps_per_epoch: int, max_epochs: int
    ) -> list[Callable[[int], float]] | None:
        """Per optimizer group (by `names`), the LR factor at each step from the thaw warmup, or
        None without one. A pure function of the config, like the phase, so resume keeps it."""
        if not self.thaw_warmup_epochs:
            return None
        thaw_epoch = {
            group: next(
                (
                    e
                    for e in range(max_epochs)
                    if group in self.trainable_groups(e, backbone_groups)
                ),
                None,
            )
            for group in backbone_groups
        }
        ramp = max(1, round(self.thaw_warmup_epochs * steps_per_epoch))
        return [
            partial(_ramp, start=thaw_epoch[name] * steps_per_epoch, steps=ramp)
            if thaw_epoch.get(name) is not None
            else _constant
            for name in names
        ]


def _ramp(step: int, start: int, steps: int) -> float:
    return min(1.0, max(0, step - start + 1) / steps)


def _constant(step: int) -> float:
    return 1.0


@dataclass(kw_only=True)
class TwoPhase(FinetuneStrategy):
    """Head only for `freeze_epochs`, then the top `unfreeze_groups` groups (None: all) as well."""

    freeze_epochs: int = 1
    unfreeze_groups: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze_epochs < 0:
            raise UserError(f"finetune.freeze_epochs={self.freeze_epochs} must be >= 0")
        if self.unfreeze_groups is not None and self.unfreeze_groups < 1:
            raise UserError(
                f"finetune.unfreeze_groups={self.unfreeze_groups} must be >= 1, or null for all"
            )

    def trainable_groups(self, epoch: int, backbone_groups: list[str]) -> list[str]:
        if epoch < self.freeze_epochs:
            return []
        n = len(backbone_groups)
        k = n if self.unfreeze_groups is None else self.unfreeze_groups
        if k > n:
            raise UserError(
                f"finetune.unfreeze_groups={k} but the backbone has {n} groups {backbone_groups}"
            )
        return backbone_groups[n - k :]


@dataclass(kw_only=True)
class Gradual(FinetuneStrategy):
    """ULMFiT's gradual unfreezing: head only for `freeze_epochs`, then one more backbone group,
    top first, every `every_epochs` epochs."""

    freeze_epochs: int = 1
    every_epochs: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze_epochs < 0:
            raise UserError(f"finetune.freeze_epochs={self.freeze_epochs} must be >= 0")
        if self.every_epochs < 1:
            raise UserError(f"finetune.every_epochs={self.every_epochs} must be >= 1")

    def trainable_groups(self, epoch: int, backbone_groups: list[str]) -> list[str]:
        if epoch < self.freeze_epochs:
            return []
        k = min(len(backbone_groups), (epoch - self.freeze_epochs) // self.every_epochs + 1)
        return backbone_groups[len(backbone_groups) - k :]


@dataclass(kw_only=True)
class Full(FinetuneStrategy):
    """Every group trains from the first step."""

    def trainable_groups(self, epoch: int, backbone_groups: list[str]) -> list[str]:
        return list(backbone_groups)


@dataclass(kw_only=True)
class LinearProbe(FinetuneStrategy):
    """Only the head trains; the backbone is a fixed feature extractor."""

    def trainable_groups(self, epoch: int, backbone_groups: list[str]) -> list[str]:
        return []

    def check_schedule(self, max_epochs: int, backbone_groups: list[str]) -> None:
        """Only the head trains, by design."""
