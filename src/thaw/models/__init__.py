"""Models: the backbone registry, the classifier module and its one builder.

The training task (thaw.models.task) is not imported here: inference imports this package and
must not pull in Lightning or torchmetrics."""

from thaw.models.backbones import Backbone, WeightsError, backbone_spec, create_backbone
from thaw.models.builder import build_model, load_trained
from thaw.models.network import ImageClassifier

__all__ = [
    "Backbone",
    "ImageClassifier",
    "WeightsError",
    "backbone_spec",
    "build_model",
    "create_backbone",
    "load_trained",
]
