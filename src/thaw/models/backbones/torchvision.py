"""The torchvision family: torchvision classification models cut into stage1..stage4.

Each model's stages are listed by hand, as submodule paths (one block per stage); it is built
with `weights=None` and its classifier stripped, and named weights come through torchvision's
weights enums (downloaded to the torch hub cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

from thaw.errors import UserError
from thaw.models.backbones.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    WeightsError,
)
from thaw.models.layer_groups import blocks_from_paths


def _resnet_strip(model: nn.Module) -> int:
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return dim


def _mobilenet_v3_strip(model: nn.Module) -> int:
    # Keep the pretrained 960 -> 1280 projection (timm's "pre-logits"); drop dropout and classifier.
    model.classifier = model.classifier[:2]
    return model.classifier[0].out_features


def _efficientnet_strip(model: nn.Module) -> int:
    dim = model.classifier[-1].in_features
    model.classifier = nn.Identity()
    return dim


def _features(*indices: int) -> list[str]:
    return [f"features.{i}" for i in indices]


_RESNET_GROUPS = {
    "stage1": ["conv1", "bn1", "layer1"],
    "stage2": ["layer2"],
    "stage3": ["layer3"],
    "stage4": ["layer4"],
}

# Groups end where the resolution halves: strides 4, 8, 16, 32.
_MOBILENET_V3_GROUPS = {
    "stage1": _features(0, 1, 2, 3),
    "stage2": _features(4, 5, 6),
    "stage3": _features(7, 8, 9, 10, 11, 12),
    "stage4": [*_features(13, 14, 15, 16), "classifier"],
}

_EFFICIENTNET_GROUPS = {
    "stage1": _features(0, 1, 2),
    "stage2": _features(3),
    "stage3": _features(4, 5),
    "stage4": _features(6, 7, 8),
}


@dataclass(frozen=True)
class _Model:
    strip_classifier: Callable[[nn.Module], int]
    groups: dict[str, list[str]]  # stage -> submodule paths


MODELS = {
    **dict.fromkeys(("resnet18", "resnet34", "resnet50"), _Model(_resnet_strip, _RESNET_GROUPS)),
    "mobilenet_v3_large": _Model(_mobilenet_v3_strip, _MOBILENET_V3_GROUPS),
    "efficientnet_b0": _Model(_efficientnet_strip, _EFFICIENTNET_GROUPS),
}


def backbone_spec(name: str, weights: str | None) -> BackboneSpec:
    if name not in MODELS:
        raise UserError(
            f"model.name={name!r} is not a torchvision backbone thaw knows; choose one of "
            f"{sorted(MODELS)}, or any timm model with model=timm model.name={name}"
        )
    return BackboneSpec(
        build=partial(_build, name, MODELS[name]),
        named_weights=partial(_named_weights, name),
        architecture=name,
    )


def _build(name: str, spec: _Model, input_size: int) -> Backbone:
    """Random init: pretrained weights are loaded afterwards, checked against this model."""
    model = torchvision.models.get_model(name, weights=None)
    feature_dim = spec.strip_classifier(model)
    blocks = blocks_from_paths(model, spec.groups)
    return Backbone(name, model, feature_dim, blocks, IMAGENET_MEAN, IMAGENET_STD)


def _named_weights(name: str, weights: str) -> dict[str, torch.Tensor]:
    """The state_dict of torchvision weights `weights` of model `name`, downloading if needed."""
    try:
        enum = torchvision.models.get_model_weights(name)[weights]
    except KeyError:
        valid = list(torchvision.models.get_model_weights(name).__members__)
        raise WeightsError(
            f"model.weights={weights!r} is neither a file nor a weights name of {name}; "
            f"valid names: {valid}, or a path to a .pth/.ckpt file, or null for random init"
        ) from None
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash is a RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        filename = enum.url.rsplit("/", 1)[-1]
        raise WeightsError(
            f"could not download the {name} weights {weights!r} from {enum.url} ({err}).\n"
            f"Fixes: place {filename} in {cache} (the torch hub cache; set TORCH_HOME to move it), "
            f"or set model.weights=/path/to/weights.pth (a state_dict or a thaw checkpoint), "
            f"or model.weights=null to train from random init."
        ) from err
