"""Calibration: whether a classifier's confidence matches how often it is right, and the fix.

The measures (expected calibration error, the reliability diagram's bins, the negative
log-likelihood) take top-1 confidences in equal-width bins, as torchmetrics does. The fix is
temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T
> 0 divides the logits before the softmax; it is fitted on held-out logits by minimising the
NLL, and leaves every prediction's class (the argmax) unchanged. Training fits it on the
validation split and stores it in the checkpoint's Preprocessing; the Predictor applies it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

# The range fit_temperature searches. A T at either end means the NLL kept falling towards it:
# typically a validation set that the model classifies entirely right (T -> 0) or at chance.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
_GOLDEN = (math.sqrt(5) - 1) / 2
_SEARCH_STEPS = 80  # the bracket shrinks by 0.618 a step: log T to ~1e-16, far below any need


def expected_calibration_error(
    probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> float:
    """The expected calibration error (l1): over `n_bins` equal-width bins of top-1 confidence,
    the mean |accuracy - confidence| of each bin weighted by its share of the samples.

    `probabilities` (N, classes) are class probabilities (rows summing to 1); `labels` (N,).
    Computed by torchmetrics' `multiclass_calibration_error(norm="l1")`."""
    probabilities, labels = _checked(probabilities, labels, n_bins)
    value = multiclass_calibration_error(
        probabilities, labels, probabilities.shape[1], n_bins=n_bins, norm="l1"
    )
    return float(value)


def reliability_bins(
    probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> list[dict[str, float | None]]:
    """The reliability diagram: for each of `n_bins` equal-width bins of top-1 confidence,
    lowest first, {lower, upper, count, confidence, accuracy}, where confidence is the mean
    top-1 probability of the bin's samples and accuracy the fraction of them predicted right
    (both None for an empty bin, so the list is JSON as it is).

    A bin holds the confidences in [lower, upper), the last one [lower, 1], as in
    `expected_calibration_error`, which equals sum(count / N * |accuracy - confidence|) over
    the bins (torchmetrics keeps confidences of exactly 1.0 apart, so the two may differ
    slightly when some are)."""
    probabilities, labels = _checked(probabilities, labels, n_bins)
    confidences, predicted = probabilities.float().max(dim=1)
    correct = (predicted == labels).float()
    boundaries = torch.linspace(0, 1, n_bins + 1)
    # As torchmetrics bins: bucketize(right=True) - 1; 1.0 itself joins the last bin.
    index = (torch.bucketize(confidences, boundaries, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins)
    confidence_sum = torch.zeros(n_bins).index_add_(0, index, confidences)
    correct_sum = torch.zeros(n_bins).index_add_(0, index, correct)
    bins: list[dict[str, float | None]] = []
    for i in range(n_bins):
        n = int(count[i])
        bins.append(
            {
                "lower": float(boundaries[i]),
                "upper": float(boundaries[i + 1]),
                "count": n,
                "confidence": float(confidence_sum[i]) / n if n else None,
                "accuracy": float(correct_sum[i]) / n if n else None,
            }
        )
    return bins


def negative_log_likelihood(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> float:
    """The mean negative log-likelihood of `labels` under softmax(logits / temperature),
    computed in float64."""
    logits, labels = _checked(logits, labels)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T that minimises the NLL of softmax(logits / T) on these held-out
    logits (N, classes) and labels (N,): temperature scaling, Guo et al. 2017.

    The NLL is convex in 1/T, so it has a single minimum along log T; a golden-section search
    over log T in [MIN_TEMPERATURE, MAX_TEMPERATURE] finds it, deterministically (same logits,
    same T). A result at either end of the range means the minimum lies beyond it."""
    logits, labels = _checked(logits, labels)
    logits = logits.detach().double()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    a, b = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    nll_a, nll_b = nll(a), nll(b)
    for _ in range(_SEARCH_STEPS):
        if nll_a <= nll_b:  # the minimum is in [low, b]
            high, b, nll_b = b, a, nll_a
            a = high - _GOLDEN * (high - low)
            nll_a = nll(a)
        else:  # in [a, high]
            low, a, nll_a = a, b, nll_b
            b = low + _GOLDEN * (high - low)
            nll_b = nll(b)
    return math.exp(a if nll_a <= nll_b else b)


def _checked(
    scores: torch.Tensor, labels: torch.Tensor, n_bins: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores on the CPU, labels as int64 on the CPU), or a ValueError that says what is
    wrong with their shapes."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"expected scores of shape (N, classes >= 2), got {tuple(scores.shape)}")
    if labels.ndim != 1 or len(labels) != len(scores):
        raise ValueError(
            f"expected one label per row: scores {tuple(scores.shape)}, labels "
            f"{tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("calibration needs at least one sample, got none")
    if n_bins is not None and (
        isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1
    ):
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return scores.detach().cpu(), labels.detach().cpu().long()
