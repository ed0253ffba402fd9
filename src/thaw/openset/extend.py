"""`model.head=extend`: add classes to a trained model rather than train again from the start.

The model is built for the new data's classes with the trained checkpoint's backbone
(`model.weights=<a thaw checkpoint>`); its head then takes the checkpoint's rows for the classes
of the same name, bit for bit, so it answers them as before from the first step. Each new class
starts from its mean training feature ("imprinting", Qi, Brown & Lowe 2018): the direction of
its features, scaled to the old rows' mean norm, with the old biases' mean, so the new class
competes with the old ones at once instead of from zero. Fine-tuning on all the classes given
follows as for any run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from thaw.errors import UserError
from thaw.models import ImageClassifier, load_trained

if TYPE_CHECKING:
    from thaw.data.datamodule import ImageDataModule

log = logging.getLogger(__name__)

HEADS = ("new", "extend")
IMPRINT_IMAGES = 1000  # training images per new class whose features give its start


@dataclass(frozen=True)
class Extension:
    """The classes a model kept from its checkpoint and those added, and the checkpoint's own
    model, which measures the old classes' accuracy before fine-tuning."""

    old: list[str]
    new: list[str]
    source: ImageClassifier


def extend_head(model: ImageClassifier, checkpoint: str, datamodule: ImageDataModule) -> Extension:
    """Copy the checkpoint's head rows into `model` for its classes of the same name and start
    the others from their mean features (see the module's docstring)."""
    source = load_trained(checkpoint)
    old = [name for name in model.classes if name in source.classes]
    new = [name for name in model.classes if name not in source.classes]
    if not old:
        raise UserError(
            f"model.head=extend: the data's classes {model.classes} share none with "
            f"model.weights={checkpoint}'s {source.classes}; give data with some of its classes, "
            "or model.head=new for a new head"
        )
    head, old_head = model.head[1], source.head[1]
    rows = [source.classes.index(name) for name in old]
    targets = [model.classes.index(name) for name in old]
    with torch.no_grad():
        head.weight[targets] = old_head.weight[rows]
        head.bias[targets] = old_head.bias[rows]
        if new:
            means = _mean_features(model, datamodule, [model.classes.index(n) for n in new])
            scale = old_head.weight.norm(dim=1).mean()
            for name, mean in zip(new, means, strict=True):
                index = model.classes.index(name)
                head.weight[index] = mean / mean.norm().clamp_min(1e-12) * scale
                head.bias[index] = old_head.bias.mean()
    log.info(
        "model.head=extend from %s: %d classes keep their head rows (%s); %d are new, started "
        "from their mean features (%s)",
        checkpoint,
        len(old),
        ", ".join(old),
        len(new),
        ", ".join(new) or "none",
    )
    return Extension(old, new, source)


def _mean_features(
    model: ImageClassifier, datamodule: ImageDataModule, labels: list[int]
) -> list[torch.Tensor]:
    """The mean backbone feature of each class in `labels` over (a sample of) its training
    images, in eval mode on the CPU."""
    loader = datamodule.plain_loader("train", IMPRINT_IMAGES * len(labels), labels)
    sums = {label: torch.zeros(model.feature_dim) for label in labels}
    counts = dict.fromkeys(labels, 0)
    training = model.training
    model.eval()
    with torch.inference_mode():
        for images, targets in loader:
            features = model.features(images.cpu()).float()
            for label in labels:
                chosen = targets.cpu() == label
                sums[label] += features[chosen].sum(dim=0)
                counts[label] += int(chosen.sum())
    model.train(training)
    return [sums[label] / max(counts[label], 1) for label in labels]


def old_class_accuracy(
    network: ImageClassifier, datamodule: ImageDataModule, old: list[str], limit: int | None = None
) -> float:
    """The share of the test images of the `old` classes that `network` names right, choosing
    among its own classes: the checkpoint's model before fine-tuning, the run's after it. With
    `limit`, of a seeded sample of that many of those images (see plain_loader)."""
    labels = [datamodule.classes.index(name) for name in old]
    right = total = 0
    network.eval()
    with torch.inference_mode():
        for images, targets in datamodule.plain_loader("test", limit=limit, labels=labels):
            predicted = network(images.cpu()).argmax(dim=1).tolist()
            names = [datamodule.classes[t] for t in targets.tolist()]
            right += sum(network.classes[p] == n for p, n in zip(predicted, names, strict=True))
            total += len(names)
    return right / max(total, 1)
