"""Per-label decision thresholds for a multi-label model: for each label the cut on its
probability that maximises its F1 on the validation images, which 0.5 rarely is for a label that
is rare, or that the model is unsure of. torchmetrics takes one threshold for every label; these
go into the model's Postprocessing, so predict, export and serve decide as the test did."""

from __future__ import annotations

import torch

# A label without a positive validation image gives no evidence: it keeps the sigmoid's midpoint.
UNTUNED = 0.5


def best_f1_threshold(probabilities: torch.Tensor, positive: torch.Tensor) -> float:
    """The threshold t on `probabilities` (N,) at which `probability >= t` has the best F1
    against `positive` (N,): halfway between the lowest probability it keeps and the next one
    below, so that images tied at a probability are kept or left together."""
    count = int(positive.sum())
    if count == 0:
        return UNTUNED
    ranked, order = probabilities.double().sort(descending=True)
    true_positives = positive[order].double().cumsum(0)
    kept = torch.arange(1, len(ranked) + 1, dtype=torch.double)
    f1 = 2 * true_positives / (kept + count)
    ends_a_tie = torch.ones(len(ranked), dtype=torch.bool)
    ends_a_tie[:-1] = ranked[:-1] > ranked[1:]
    f1[~ends_a_tie] = -1.0  # a cut inside a tie is not one a threshold can make
    best = int(f1.argmax())
    below = float(ranked[best + 1]) if best + 1 < len(ranked) else 0.0
    return (float(ranked[best]) + below) / 2


def tune_thresholds(probabilities: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each label's best_f1_threshold: `probabilities` and multi-hot `labels` are (N, labels)."""
    return [
        best_f1_threshold(probabilities[:, i], labels[:, i].bool())
        for i in range(probabilities.shape[1])
    ]


def f1_macro(probabilities: torch.Tensor, labels: torch.Tensor, thresholds: list[float]) -> float:
    """F1 averaged over labels of the sets `thresholds` give (a label with neither a positive
    nor a predicted one counts 0, as torchmetrics counts it)."""
    predicted = probabilities >= torch.tensor(thresholds, dtype=probabilities.dtype)
    truth = labels.bool()
    true_positives = (predicted & truth).sum(0).double()
    denominator = predicted.sum(0).double() + truth.sum(0).double()
    return float((2 * true_positives / denominator.clamp(min=1)).mean())
