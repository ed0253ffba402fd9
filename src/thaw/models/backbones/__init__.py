"""Backbones: pretrained models turned into feature extractors cut into stage1..stage4.

A model family is a module of this package (`torchvision.py`, `timm.py`) with a
`backbone_spec(name, weights) -> BackboneSpec`; the registry imports it when a config first names
the family (`model.family`), so timm is imported only by runs that use it. Weights files, name
lookup and the fit check are shared in `registry.py`.
"""

from thaw.models.backbones.registry import (
    FAMILIES,
    HEAD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    STAGES,
    Backbone,
    BackboneSpec,
    WeightsError,
    backbone_spec,
    create_backbone,
)

__all__ = [
    "FAMILIES",
    "HEAD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STAGES",
    "Backbone",
    "BackboneSpec",
    "WeightsError",
    "backbone_spec",
    "create_backbone",
]
