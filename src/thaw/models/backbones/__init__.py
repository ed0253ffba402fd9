"""Backbones: pretrained models turned into feature extractors with layer groups stage1..stage4.

A model family is one module beside `torchvision.py` (e.g. `timm.py`) that, for each model it
offers, calls `register(name, BackboneSpec(build, groups, named_weights, mean, std))`: `build`
returns the model with its classifier stripped and its feature dim, `groups` names the submodules
of stage1..stage4 lowest first, and `named_weights` returns the state_dict of a named pretrained
weights value or raises WeightsError. Import the module below so its names are registered; weights
files, name lookup and the fit check are shared in `registry.py`.
"""

from thaw.models.backbones import torchvision  # noqa: F401  (registers its backbones)
from thaw.models.backbones.registry import (
    BACKBONES,
    HEAD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    WeightsError,
    backbone_spec,
    create_backbone,
    register,
)

__all__ = [
    "BACKBONES",
    "HEAD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneSpec",
    "WeightsError",
    "backbone_spec",
    "create_backbone",
    "register",
]
