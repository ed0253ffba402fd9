"""The training loss: cross-entropy with label smoothing, per-class weights and focal modulation;
for multi-label data, binary cross-entropy per label with the same three in their multi-label
meanings, or the asymmetric loss.

For a shop's catalogue where one class has ten times the photos of another: `class_weights`
(`balanced`: N / (classes x count), as scikit-learn's `compute_class_weight` gives) makes each
class count alike, and `focal_gamma` (Lin et al., 2017) down-weights the examples the model
already gets right by (1 - p)^gamma. With gamma 0 the loss is torch's own cross_entropy.

Multi-label: smoothing moves each label's 0/1 target towards 1/2; a class weight scales its
label's positive term (`balanced`: negatives / positives, torch's `pos_weight`, so a rare label's
few positives count as much as its many negatives); focal_gamma modulates both terms. `asl`
(model.loss) is the asymmetric loss of Ridnik et al. (2021): negatives focused harder than
positives (gamma 4 against 0) and easy negatives, p < 0.05, dropped, for label sets where most
labels are absent from most images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from thaw import checks
from thaw.errors import UserError

BALANCED = "balanced"
# model.loss: auto is cross-entropy, or binary cross-entropy per label for multi-label data.
LOSSES = ("auto", "asl")
# The asymmetric loss's settings, the paper's for multi-label image sets.
ASL_GAMMA_NEG, ASL_GAMMA_POS, ASL_CLIP = 4.0, 0.0, 0.05


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
    if value == BALANCED and labels.ndim == 2:
        positives = labels.cpu().double().sum(dim=0)
        if (positives == 0).any():
            empty = [c for c, n in zip(classes, positives.tolist(), strict=True) if n == 0]
            raise UserError(f"model.class_weights=balanced: no training image has {empty}")
        return ((len(labels) - positives) / positives).clamp(min=1e-3).tolist()
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


class MultiLabelLoss(nn.Module):
    """Mean over images and labels of each label's binary loss, of logits (B, C) against
    multi-hot (or mixed, soft) targets (B, C): torch's binary_cross_entropy_with_logits where
    nothing focuses, else the asymmetric form (Ridnik et al. 2021), of which focal loss is the
    symmetric case."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        gamma_pos: float = 0.0,
        gamma_neg: float = 0.0,
        clip: float = 0.0,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.gamma_pos, self.gamma_neg, self.clip = gamma_pos, gamma_neg, clip
        weight = None if class_weights is None else torch.tensor(class_weights)
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / 2
        if not (self.gamma_pos or self.gamma_neg or self.clip):
            return F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
        logits, target = logits.float(), target.float()
        p = logits.sigmoid()
        p_neg = (p - self.clip).clamp(min=0) if self.clip else p
        # log(p) and log(1 - p) from the logits, where they do not underflow.
        log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
        if self.clip:
            log_not_p = torch.log1p(-p_neg.clamp(max=1 - 1e-6))
        positive = target * (1 - p).pow(self.gamma_pos) * log_p
        if self.pos_weight is not None:
            positive = positive * self.pos_weight
        negative = (1 - target) * p_neg.pow(self.gamma_neg) * log_not_p
        return -(positive + negative).mean()


def training_loss(
    kind: str,
    multilabel: bool,
    label_smoothing: float,
    class_weights: Sequence[float] | None,
    focal_gamma: float,
) -> nn.Module:
    """The loss `model.loss` names, for single- or multi-label data."""
    checks.choice("model.loss", kind, LOSSES)
    check_settings(label_smoothing, focal_gamma)
    if not multilabel:
        if kind == "asl":
            raise UserError(
                "model.loss=asl is for multi-label data (a label cell with several labels, or "
                "data.multilabel=true); single-label data trains with model.loss=auto"
            )
        return ClassificationLoss(label_smoothing, class_weights, focal_gamma)
    if kind == "asl":
        return MultiLabelLoss(
            label_smoothing, class_weights, ASL_GAMMA_POS, ASL_GAMMA_NEG, ASL_CLIP
        )
    return MultiLabelLoss(label_smoothing, class_weights, focal_gamma, focal_gamma)
