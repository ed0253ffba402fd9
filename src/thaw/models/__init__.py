"""Models: the backbone registry and the classifier LightningModule."""

from thaw.models.backbones import Backbone, WeightsError, backbone_spec, create_backbone
from thaw.models.classifier import Classifier

__all__ = [
    "Backbone",
    "Classifier",
    "WeightsError",
    "backbone_spec",
    "create_backbone",
]
