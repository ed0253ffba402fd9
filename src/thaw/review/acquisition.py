"""Which unlabelled images to label next: acquisition strategies as pure functions of a model's
outputs on the pool, so acquire.py and the active-learning benchmark rank with the same code.

Each strategy takes the pool's class probabilities (N, C), its pooled backbone features (N, D),
the number of images to choose and a seed, and returns the chosen pool positions, most useful
first, with their scores (higher: more useful). Uncertainty strategies rank each image on its
own, so near-duplicates of one uncertain image all rank high together; `kcenter` (Sener and
Savarese 2018, core-set selection) spreads its picks over the feature space instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from thaw.models import ImageClassifier

Strategy = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


@torch.inference_mode()
def pool_outputs(model: ImageClassifier, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities (N, C) and features (N, D) the strategies read, on the CPU, from one
    pass through the backbone of a preprocessed batch (on the model's device)."""
    features = model.features(inputs)
    probabilities = model.postprocessing.probabilities(model.head(features).float())
    return probabilities.cpu(), features.float().cpu()


def _ranked(scores: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `budget` highest scores, highest first (ties in pool order)."""
    _check_budget(budget, len(scores))
    values, order = torch.sort(scores, descending=True, stable=True)
    return order[:budget], values[:budget]


def _check_budget(budget: int, size: int) -> None:
    if not 1 <= budget <= size:
        raise ValueError(f"budget must be in [1, {size}] (the pool's size), got {budget}")


def random(
    probabilities: torch.Tensor, features: torch.Tensor, budget: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded draw: the baseline every other strategy has to beat. Scores are the draws."""
    draws = torch.rand(len(probabilities), generator=torch.Generator().manual_seed(seed))
    return _ranked(draws, budget)


def least_confidence(
    probabilities: torch.Tensor, features: torch.Tensor, budget: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - the top probability: the images the model is least sure of."""
    return _ranked(1 - probabilities.max(dim=1).values, budget)


def margin(
    probabilities: torch.Tensor, features: torch.Tensor, budget: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - (p1 - p2): the images closest to a decision boundary between two classes."""
    top = probabilities.topk(min(2, probabilities.shape[1]), dim=1).values
    second = top[:, 1] if top.shape[1] > 1 else torch.zeros(len(top))
    return _ranked(1 - (top[:, 0] - second), budget)


def entropy(
    probabilities: torch.Tensor, features: torch.Tensor, budget: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """-sum p log p: uncertainty spread over every class, not only the top two."""
    return _ranked(-torch.special.xlogy(probabilities, probabilities).sum(dim=1), budget)


def kcenter(
    probabilities: torch.Tensor, features: torch.Tensor, budget: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-center greedy: each pick is the image farthest (L2 on the features) from every image
    picked so far, the first the one farthest from the pool's mean feature, so the picks cover
    the pool and a cluster of near-duplicates gets one. A pick's score is that distance when it
    was picked."""
    _check_budget(budget, len(features))
    points = features.double()
    nearest = torch.linalg.vector_norm(points - points.mean(dim=0), dim=1)
    order, scores = [], []
    for _ in range(budget):
        pick = int(nearest.argmax())
        scores.append(float(nearest[pick]))
        distances = torch.linalg.vector_norm(points - points[pick], dim=1)
        # The mean only chose the first pick: from then on, the distance to the nearest pick.
        nearest = torch.minimum(nearest, distances) if order else distances
        order.append(pick)
        nearest[order] = -1.0  # picked: never again, even where every distance left is 0
    return torch.tensor(order, dtype=torch.long), torch.tensor(scores, dtype=torch.float32)


STRATEGIES: dict[str, Strategy] = {
    "random": random,
    "least_confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
    "kcenter": kcenter,
}
