"""How well a model's rejection rule tells its classes from images of none of them: the figures
eval.py adds with `ood=<folder>`, from the scores of the known test images and the OOD ones."""

from __future__ import annotations

from typing import Any

import torch

from thaw.openset.scores import auroc, fpr_at_95_tpr
from thaw.postprocess import Rejection

COVERAGE_POINTS = 20  # the accuracy-coverage curve, every 5% of the known images kept


def open_set_metrics(
    known: torch.Tensor, correct: torch.Tensor, unknown: torch.Tensor, rule: Rejection
) -> dict[str, Any]:
    """`test/ood_auroc`, `test/ood_fpr95`, the share of OOD images the stored threshold rejects
    (`test/ood_rejected`) and of known test images it keeps (`test/known_kept`), from the known
    images' scores and whether each was classified right (`correct`), and the OOD scores.
    `curves` holds what the report draws: both score lists, and the accuracy on the known
    images kept against the share kept, keeping the highest scores first."""
    order = known.argsort(descending=True)
    right = correct[order].double().cumsum(0)
    points = [
        max(1, round(len(known) * i / COVERAGE_POINTS)) for i in range(1, COVERAGE_POINTS + 1)
    ]
    return {
        "test/ood_auroc": auroc(known, unknown),
        "test/ood_fpr95": fpr_at_95_tpr(known, unknown),
        "test/ood_rejected": float((~rule.known(unknown)).double().mean()),
        "test/known_kept": float(rule.known(known).double().mean()),
        "curves": {
            "known_scores": known.tolist(),
            "ood_scores": unknown.tolist(),
            "threshold": rule.threshold,
            "coverage": [n / len(known) for n in points],
            "accuracy": [float(right[n - 1] / n) for n in points],
        },
    }
