"""FixMatch (Sohn et al. 2020): confident predictions on a weak view of an unlabeled image
become the targets of a strong view of the same image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from thaw import checks
from thaw.data.augment.options import AugmentOptions
from thaw.errors import UserError


class UnlabeledLoss(NamedTuple):
    """The unlabeled term of a step: its `loss`, which images passed the threshold (`mask`) and
    the pseudo-labels (`targets`) of all of them."""

    loss: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor


def fixmatch_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float
) -> UnlabeledLoss:
    """Cross-entropy of the strong view's logits against the weak view's arg-max, for the images
    whose weak max probability is at least `threshold`, averaged over every unlabeled image (as
    FixMatch does: a step with few confident images contributes little). The weak view gives no
    gradient. A threshold of 1 keeps no image: a softmax reaches 1 only by rounding."""
    probabilities = weak_logits.detach().float().softmax(dim=1)
    confidence, targets = probabilities.max(dim=1)
    if threshold < 1:
        mask = confidence >= threshold
    else:
        mask = torch.zeros_like(confidence, dtype=torch.bool)
    per_image = F.cross_entropy(strong_logits.float(), targets, reduction="none")
    loss = (per_image * mask).sum() / max(len(mask), 1)
    return UnlabeledLoss(loss, mask, targets)


@dataclass(frozen=True)
class FixMatch:
    """The `semi=fixmatch` group (conf/semi/fixmatch.yaml), checked.

    Each step takes `mu` unlabeled images per labelled one; their `weak` view (augment keys)
    gives pseudo-labels where the model is at least `threshold` sure, which the `strong` view
    learns with weight `weight`. The first `start_epoch` epochs are supervised only: a warm-up,
    and the validation accuracy the unlabeled epochs must beat (thaw.semi.callback)."""

    mu: int
    threshold: float
    weight: float
    start_epoch: int
    weak: AugmentOptions
    strong: AugmentOptions

    def __post_init__(self) -> None:
        checks.integer("semi.mu", self.mu, 1)
        checks.number("semi.threshold", self.threshold, 0.0, maximum=1.0)
        checks.number("semi.weight", self.weight, 0.0)
        checks.integer("semi.start_epoch", self.start_epoch, 0)

    @classmethod
    def of(cls, weak: Mapping[str, Any], strong: Mapping[str, Any], **values: Any) -> FixMatch:
        """The settings from the group's keys, the views parsed as augment options."""
        views = {
            "weak": AugmentOptions.parse(weak, "semi.weak"),
            "strong": AugmentOptions.parse(strong, "semi.strong"),
        }
        return cls(**views, **values)

    def check_reachable(self, label_smoothing: float, classes: int) -> None:
        """Refuse a threshold above the most confidence the supervised loss lets the model
        have: label smoothing eps makes 1 - eps + eps/K the optimal top probability."""
        highest = 1 - label_smoothing + label_smoothing / classes
        if label_smoothing > 0 and self.threshold > highest:
            raise UserError(
                f"model.label_smoothing={label_smoothing:g} caps the model's confidence at "
                f"{highest:.3f} with {classes} classes, below semi.threshold={self.threshold:g}: "
                "almost no pseudo-label would pass. Use model.label_smoothing=0 (semi=fixmatch's "
                f"own) or a semi.threshold below {highest:.3f}"
            )

    def loss(self, weak_logits: torch.Tensor, strong_logits: torch.Tensor) -> UnlabeledLoss:
        """`fixmatch_loss` at this run's threshold."""
        return fixmatch_loss(weak_logits, strong_logits, self.threshold)
