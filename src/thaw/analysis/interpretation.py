"""What a classifier got right and wrong on its test set, as fastai's ClassificationInterpretation
answers it: per-class precision, recall and F1, the most-confused pairs, the top losses.

One pass over the test loader keeps every logit and label, and a bounded pool of example inputs
(the highest-loss mistakes and a few correct images per class), so the report can show pictures
without holding the whole test set in memory.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from thaw.models.task import TOP5_MIN_CLASSES


@dataclass(frozen=True)
class Example:
    """One test image, as the model saw it (normalised input), with what it made of it."""

    index: int
    image: torch.Tensor  # (C, H, W) on the CPU
    label: int
    predicted: int
    prob: float  # the predicted class's probability
    loss: float  # cross-entropy of the true class


@dataclass
class Collected:
    logits: torch.Tensor  # (N, classes)
    labels: torch.Tensor  # (N,)
    mistakes: list[Example] = field(default_factory=list)  # highest loss first
    correct: dict[int, list[Example]] = field(default_factory=dict)  # class -> the first few


@torch.inference_mode()
def collect(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    temperature: float = 1.0,
    mistakes: int = 256,
    correct_per_class: int = 2,
) -> Collected:
    """Run `model` (in eval mode) over `batches`, keeping logits, labels and example inputs: the
    `mistakes` highest-loss wrong predictions and the first `correct_per_class` right ones of each
    class. Probabilities and losses use softmax(logits / temperature)."""
    device = next(model.parameters()).device
    logits_all, labels_all = [], []
    heap: list[tuple[float, int, Example]] = []  # min-heap on loss: the pool's weakest on top
    correct: dict[int, list[Example]] = {}
    seen = 0
    for images, labels in batches:
        logits = model(images.to(device)).float().cpu()
        labels = labels.cpu()
        log_probs = (logits / temperature).log_softmax(dim=-1)
        probs, predicted = log_probs.exp().max(dim=-1)
        losses = -log_probs.gather(1, labels[:, None])[:, 0]
        for i in range(len(labels)):
            label, guess = int(labels[i]), int(predicted[i])
            keep_right = guess == label and len(correct.get(label, [])) < correct_per_class
            keep_wrong = guess != label and (len(heap) < mistakes or float(losses[i]) > heap[0][0])
            if not (keep_right or keep_wrong):
                continue
            example = Example(
                seen + i, images[i].cpu(), label, guess, float(probs[i]), float(losses[i])
            )
            if keep_right:
                correct.setdefault(label, []).append(example)
            elif len(heap) < mistakes:
                heapq.heappush(heap, (example.loss, example.index, example))
            else:
                heapq.heapreplace(heap, (example.loss, example.index, example))
        seen += len(labels)
        logits_all.append(logits)
        labels_all.append(labels)
    ranked = [example for _, _, example in sorted(heap, key=lambda item: (-item[0], item[1]))]
    return Collected(torch.cat(logits_all), torch.cat(labels_all), ranked, correct)


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = predicted."""
    return torch.bincount(labels * classes + predicted, minlength=classes * classes).view(
        classes, classes
    )


def per_class(matrix: torch.Tensor, classes: list[str]) -> list[dict[str, float | int | str]]:
    """Precision, recall, F1 and support of each class from the confusion matrix, as sklearn's
    classification_report counts them (0 where a ratio has nothing to divide by)."""
    matrix = matrix.double()
    hits = matrix.diag()
    support = matrix.sum(dim=1)
    predicted = matrix.sum(dim=0)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, hits / support.clamp(min=1), 0.0)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-12), 0.0)
    return [
        {
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    ]


def most_confused(matrix: torch.Tensor, n: int = 10) -> list[tuple[int, int, int]]:
    """The `n` largest off-diagonal cells as (true, predicted, count), largest first (ties in
    row-major order), zero cells left out."""
    off = matrix.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)
    size = matrix.shape[0]
    return [
        (int(i) // size, int(i) % size, int(c))
        for c, i in zip(counts[:n], flat[:n], strict=True)
        if c > 0
    ]


def headline(logits: torch.Tensor, labels: torch.Tensor, table: list[dict]) -> dict[str, float]:
    """Top-1 accuracy, top-5 accuracy (only with more than 5 classes, where it means something)
    and macro F1."""
    classes = logits.shape[1]
    values = {
        "acc": float((logits.argmax(dim=-1) == labels).double().mean()),
        "f1_macro": sum(row["f1"] for row in table) / classes,
    }
    if classes > TOP5_MIN_CLASSES:
        top5 = logits.topk(5, dim=-1).indices
        values["acc_top5"] = float((top5 == labels[:, None]).any(dim=-1).double().mean())
    return values
