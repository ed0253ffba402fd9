"""The training loss: cross-entropy with label smoothing, per-class weights and focal modulation.

For a shop's catalogue where one class has ten times the photos of another: `class_weights`
(`balanced`: N / (classes x count), as scikit-learn's `compute_class_weight` gives) makes each
class count alike, and `focal_gamma` (Lin et al., 2017) down-weights the examples the model
already gets right by (1 - p)^gamma. With gamma 0 the loss is torch's own cross_entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from thaw import checks
from thaw.errors import UserError

BALANCED = "balanced"


def check_settings(label_smoothing: object, focal_gamma: object) -> None:
    """The loss's settings (`model.*`), checked before a run reads its data as well as here:
    smoothing of 1 or more leaves no trace of the label, and a negative gamma weights the easy
    examples up."""
    checks.fraction("model.label_smoothing", label_smoothing)
    checks.number("model.focal_gamma", focal_gamma, minimum=0)


def resolve_class_weights(
    value: str | Sequence[float] | None, labels: torch.Tensor, classes: list[str]
) -> list[float] | None:
    """`model.class_weights` as one weight per class: None, `balanced` from the training
    `labels`, or the given list (checked: one positive number per class, in class order)."""
    if value is None:
        return None
    if value == BALANCED:
        counts = torch.bincount(labels.cpu(), minlength=len(classes)).double()
        if (counts == 0).any():
            empty = [c for c, n in zip(classes, counts.tolist(), strict=True) if n == 0]
            raise UserError(f"model.class_weights=balanced: no training images of {empty}")
        return (counts.sum() / (len(classes) * counts)).tolist()
    if isinstance(value, str) or len(value) != len(classes) or min(value) <= 0:
        raise UserError(
            f"model.class_weights={value!r} must be null, {BALANCED}, or {len(classes)} positive "
            f"numbers in class order {classes}"
        )
    return [float(w) for w in value]


class ClassificationLoss(nn.Module):
    """Mean loss of logits (B, C) against labels (B,) or soft targets (B, C) (mixup)."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        focal_gamma: float = 0.0,
    ) -> None:
        super().__init__()
        check_settings(label_smoothing, focal_gamma)
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        weight = None if class_weights is None else torch.tensor(class_weights)
        self.register_buffer("weight", weight, persistent=False)  # not in checkpoints

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.focal_gamma == 0:
            return F.cross_entropy(
                logits, target, weight=self.weight, label_smoothing=self.label_smoothing
            )
        log_p = logits.float().log_softmax(dim=-1)
        hard = target.ndim == 1
        probs = F.one_hot(target, logits.shape[-1]).to(log_p.dtype) if hard else target.float()
        if self.label_smoothing:
            probs = probs * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[-1]
        terms = -probs * (1 - log_p.exp()).pow(self.focal_gamma) * log_p
        if self.weight is None:
            return terms.sum(dim=-1).mean()
        # Normalised as cross_entropy normalises: by the labels' weights, or by the batch size.
        total = (terms * self.weight).sum()
        return total / (self.weight[target].sum() if hard else len(target))
