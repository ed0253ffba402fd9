"""Fitting the rejection rule of a trained model: its score on what the model saw, its threshold
on the known classes' validation images.

The feature scores are fitted on the training split's penultimate features (the evaluation
transform, a seeded sample of at most `fit_images`); the threshold is the validation scores'
(1 - keep) quantile, so `keep` of known images pass. The validation split is the right place for
it: its images are not the ones the features were fitted on, as new photos are not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from thaw import checks
from thaw.checkpoint import REJECTION_PREFIX, read_checkpoint, run_record, update_run_record
from thaw.errors import UserError
from thaw.models import ImageClassifier
from thaw.openset.scores import FEATURE_SCORES, SCORES, OpenSetScore, threshold_for
from thaw.postprocess import Postprocessing, Rejection

if TYPE_CHECKING:
    from thaw.data.datamodule import ImageDataModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RejectSettings:
    """The `reject` group of conf/train.yaml: which score, how many known images pass, and the
    answer for the others; `score: null` fits no rule."""

    score: str | None
    keep: float
    label: str
    k: int
    bank_size: int
    fit_images: int

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> RejectSettings:
        """The settings, each checked: a mistake is answered before training."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        missing = sorted({f.name for f in fields(cls)} - set(values))
        if unknown or missing:
            raise UserError(
                f"the reject group has unknown keys {unknown} or lacks {missing}: its keys are "
                f"{[f.name for f in fields(cls)]} (see conf/train.yaml)"
            )
        settings = cls(**values)
        checks.choice("reject.score", settings.score, [*SCORES, None])
        checks.number("reject.keep", settings.keep, 0, maximum=1)
        if not 0 < settings.keep < 1:
            raise UserError(
                f"reject.keep must be between 0 and 1 (the share of known images that pass), "
                f"got {settings.keep!r}: e.g. reject.keep=0.95"
            )
        if not isinstance(settings.label, str) or not settings.label.strip():
            raise UserError(f"reject.label={settings.label!r} must be a name, e.g. unknown")
        checks.integer("reject.k", settings.k, 1)
        checks.integer("reject.bank_size", settings.bank_size, settings.k)
        checks.integer("reject.fit_images", settings.fit_images, 1)
        return settings


def fit_rejection(
    network: ImageClassifier,
    datamodule: ImageDataModule,
    settings: RejectSettings,
    val_batches: int,
    device: torch.device,
) -> tuple[Rejection, OpenSetScore]:
    """The rule for `network` (eval mode, on `device`): its score fitted on training features
    where it needs them, its threshold on the first `val_batches` validation batches."""
    assert settings.score is not None
    if settings.label in network.classes:
        raise UserError(
            f"reject.label={settings.label!r} is one of the model's classes: give the rejected "
            "images another name, e.g. reject.label=unknown"
        )
    dims = (settings.score, network.feature_dim, len(network.classes))
    score = OpenSetScore(*dims)
    if settings.score in FEATURE_SCORES:
        train = datamodule.plain_loader("train", settings.fit_images)
        features, labels = _features(network, train, device)
        bank = min(settings.bank_size, len(features))
        score = OpenSetScore(*dims, bank, min(settings.k, bank))
        score.fit(features, labels, torch.Generator().manual_seed(datamodule.seed))
    score.to(device)
    temperature = network.postprocessing.temperature
    scores = []
    with torch.inference_mode():
        for images, _ in islice(datamodule.val_dataloader(), val_batches):
            features = network.features(images.to(device))
            scores.append(score(features, network.head(features), temperature).cpu())
    known = torch.cat(scores)
    knn = settings.score == "knn"
    rule = Rejection(
        settings.score,
        threshold_for(known, settings.keep),
        settings.keep,
        settings.label,
        score.k if knn else 0,
        len(score.bank) if knn else 0,
    )
    log.info(
        "Rejection rule: score %s, threshold %.6g, which %d of %d known validation images pass "
        "(reject.keep=%s); an image below it is answered %r with reject=true",
        rule.score,
        rule.threshold,
        int(rule.known(known).sum()),
        len(known),
        rule.keep,
        rule.label,
    )
    return rule, score.cpu()


def _features(
    network: ImageClassifier, batches: Iterable[Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, D) on the CPU, and labels, of every batch."""
    features, labels = [], []
    with torch.inference_mode():
        for images, targets in batches:
            features.append(network.features(images.to(device)).float().cpu())
            labels.append(targets.cpu())
    return torch.cat(features), torch.cat(labels)


def store_rejection(path: str | Path, rule: Rejection, score: OpenSetScore) -> None:
    """Write `rule` into the post-processing record of the checkpoint at `path`, and its
    score's buffers into the weights (replacing any earlier rule's), atomically."""
    record = run_record(read_checkpoint(path), path)
    postprocessing = Postprocessing.from_dict(record.postprocessing)
    update_run_record(
        path,
        (REJECTION_PREFIX, score.state_dict()),
        postprocessing=Postprocessing(postprocessing.temperature, rule).to_dict(),
    )
