"""Classifiers and training tasks that tests build by hand, from a backbone they choose: a plain
head (no dropout) and a plain loss, unless the test says otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thaw.models import ImageClassifier
from thaw.models.backbones import Backbone
from thaw.models.task import ClassificationTask
from thaw.postprocess import Postprocessing
from thaw.preprocess import Preprocessing


def classifier(
    backbone: Backbone,
    classes: Sequence[str],
    preprocessing: Preprocessing,
    head_dropout: float = 0.0,
    config: dict[str, Any] | None = None,
    channels_last: bool = False,
) -> ImageClassifier:
    """An ImageClassifier with a new head on `backbone` (temperature 1)."""
    return ImageClassifier(
        backbone,
        classes,
        preprocessing,
        Postprocessing(),
        head_dropout,
        config or {},
        channels_last,
    )


def task(model: ImageClassifier, **settings: Any) -> ClassificationTask:
    """The training task around `model`: `settings` are ClassificationTask's arguments, each
    left out one absent (no optimizer, scheduler or strategy; plain cross-entropy)."""
    values = {
        "optimizer": None,
        "finetune": None,
        "scheduler": None,
        "label_smoothing": 0.0,
        "class_weights": None,
        "focal_gamma": 0.0,
        **settings,
    }
    return ClassificationTask(model, **values)
