"""How much an image looks like the classes a model was trained on: higher means more like them.

Four scores, each from what the network computes anyway:
- `msp`: the largest temperature-scaled softmax probability (Hendrycks & Gimpel 2017);
- `energy`: T * logsumexp(logits / T), the negative free energy (Liu et al. 2020);
- `mahalanobis`: the squared Mahalanobis distance d of the penultimate features to the nearest
  class mean, under one covariance shared by the classes (Lee et al. 2018), as D / (D + d) for D
  features: 1 at a class mean, towards 0 far away. The same order as -d, on a scale where float32
  rounding stays small (d of an odd image runs to 1e5 and more);
- `knn`: the cosine similarity of the L2-normalised features to their k-th nearest training
  feature (Sun et al. 2022).

The feature scores keep what they need (class means and precision, or the feature bank) as
buffers of an nn.Module, so they live in the model's weights, its checkpoint digest and its
exported graph; only plain functions of tensors are used, which ONNX exports as they are.
"""

from __future__ import annotations

import torch
from torch import nn

SCORES = ("msp", "energy", "mahalanobis", "knn")
FEATURE_SCORES = ("mahalanobis", "knn")
# Added to the shared covariance's diagonal, relative to its mean variance, so that it inverts
# where the features have fewer dimensions' worth of images than dimensions.
_SHRINKAGE = 1e-3


class OpenSetScore(nn.Module):
    """`score(features, logits, temperature)` -> (B,) for the method `score`.

    For `mahalanobis` it holds `means` (classes, D) and `precision` (D, D); for `knn`, `bank`
    (bank_size, D) of normalised training features and `k`. Built empty with the shapes a
    record gives, then loaded, or filled by `fit`."""

    def __init__(
        self, score: str, feature_dim: int, num_classes: int, bank_size: int = 0, k: int = 0
    ) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; known: {list(SCORES)}")
        self.score = score
        self.k = k
        if score == "mahalanobis":
            self.register_buffer("means", torch.zeros(num_classes, feature_dim))
            self.register_buffer("precision", torch.zeros(feature_dim, feature_dim))
        elif score == "knn":
            self.register_buffer("bank", torch.zeros(bank_size, feature_dim))

    @property
    def uses_features(self) -> bool:
        return self.score in FEATURE_SCORES

    def fit(self, features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> None:
        """Fill the buffers from training features (N, D) and labels (N,); the bank keeps a
        random `bank_size` of them (all, where there are fewer)."""
        features = features.float()
        if self.score == "mahalanobis":
            classes = torch.arange(len(self.means))
            means = torch.stack([features[labels == c].mean(0) for c in classes.tolist()])
            centred = features - means[labels]
            covariance = centred.T @ centred / len(features)
            ridge = _SHRINKAGE * covariance.diagonal().mean().clamp_min(1e-12)
            eye = torch.eye(len(covariance), dtype=covariance.dtype)
            self.means = means
            self.precision = torch.linalg.inv(covariance + ridge * eye)
        elif self.score == "knn":
            chosen = torch.randperm(len(features), generator=generator)[: len(self.bank)]
            self.bank = nn.functional.normalize(features[chosen], dim=1)

    def forward(
        self, features: torch.Tensor, logits: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        logits = logits.float() / temperature
        if self.score == "msp":
            return logits.softmax(dim=1).amax(dim=1)
        if self.score == "energy":
            return temperature * torch.logsumexp(logits, dim=1)
        features = features.float()
        if self.score == "mahalanobis":
            # Centred before the product: the expanded form loses everything to cancellation
            # in float32 where the features are large.
            centred = features[:, None, :] - self.means[None]  # (B, classes, D)
            distances = ((centred @ self.precision) * centred).sum(dim=2).amin(dim=1)
            dims = features.shape[1]
            return dims / (dims + distances)
        similarities = nn.functional.normalize(features, dim=1) @ self.bank.T
        return similarities.topk(self.k, dim=1).values[:, -1]


def threshold_for(scores: torch.Tensor, keep: float) -> float:
    """The score that `keep` of `scores` reach or pass: the known images' (1 - keep) quantile."""
    return float(torch.quantile(scores.double(), 1.0 - keep, interpolation="lower"))


def auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """The chance that a known image scores above an unknown one (ties count half): the area
    under the ROC curve of telling them apart, by ranks (Mann-Whitney), for scores of any
    range."""
    scores = torch.cat([known, unknown]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    for value in scores.unique()[scores.unique(return_counts=True)[1] > 1]:
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n, m = len(known), len(unknown)
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def fpr_at_95_tpr(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """The share of unknown images that pass the threshold at which 95% of known ones pass."""
    return float((unknown >= threshold_for(known, 0.95)).double().mean())
