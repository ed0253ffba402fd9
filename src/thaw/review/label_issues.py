"""Suspect labels, ranked by cleanlab (confident learning, Northcutt et al. 2021) from
out-of-fold probabilities: which images to look at first, with the label the models suggest."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from thaw.errors import UserError
from thaw.review.out_of_fold import OutOfFold
from thaw.review.queue import Queued

# cleanlab's own choices: how find_label_issues flags (filter_by) and how it ranks (rank_by).
FILTERS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_self_confidence",
    "low_normalized_margin",
)
RANKINGS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
COLUMNS = ("given", "suggested", "quality", "rank")
EXTRA = "review"  # pip install "thaw-vision[review]" brings cleanlab


def require_cleanlab() -> ModuleType:
    """cleanlab, or an error naming the extra that installs it: said before any fold trains."""
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError as err:
        raise UserError(
            "label_issues needs cleanlab, which is not installed: "
            f"pip install 'thaw-vision[{EXTRA}]'"
        ) from err
    return cleanlab


def label_issues(oof: OutOfFold, filter_by: str, rank_by: str) -> list[Queued]:
    """The images cleanlab flags, worst first: each with its given label, the label its
    out-of-fold model gives it (the suggestion) and cleanlab's label quality score (low: the
    given label is unlikely)."""
    cleanlab = require_cleanlab()
    labels = oof.labels.numpy()
    probabilities = oof.probabilities.double().numpy()
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # float32 sums drift off 1
    flagged = cleanlab.filter.find_label_issues(
        labels, probabilities, filter_by=filter_by, return_indices_ranked_by=rank_by, n_jobs=1
    )
    quality = cleanlab.rank.get_label_quality_scores(labels, probabilities, method=rank_by)
    suggested = probabilities.argmax(axis=1)
    return [
        Queued(
            key=oof.keys[i],
            picture=oof.pictures[i],
            label=oof.classes[suggested[i]],
            prob=float(probabilities[i, suggested[i]]),
            score=float(quality[i]),
            given=oof.classes[labels[i]],
        )
        for i in flagged.tolist()
    ]


def write_issues(path: Path, issues: Sequence[Queued], column: str) -> None:
    """label_issues.csv: `column` (path or index), given, suggested, quality, rank."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([column, *COLUMNS])
        for rank, item in enumerate(issues, start=1):
            writer.writerow([item.key, item.given, item.label, f"{item.score:.6f}", rank])


def write_scores(folder: Path, oof: OutOfFold, column: str) -> None:
    """oof_probs.npy (N, classes) and oof_images.csv, its rows' images: `column`, the given
    label and the fold that held the image out."""
    np.save(folder / "oof_probs.npy", oof.probabilities.float().numpy())
    with (folder / "oof_images.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([column, "given", "fold"])
        for key, label, fold in zip(oof.keys, oof.labels.tolist(), oof.folds.tolist(), strict=True):
            writer.writerow([key, oof.classes[label], fold])
