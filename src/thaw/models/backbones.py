"""Backbone registry: a torchvision model turned into a feature extractor with ordered layer groups.

Every backbone is named the same way, `stage1` (lowest) to `stage4` (highest), so per-group learning
rates, logs (`lr/stage4`) and sweeps compare across architectures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


@dataclass(frozen=True)
class BackboneSpec:
    """How to cut a torchvision model: what to strip, and which submodules form each group."""

    strip_classifier: Callable[[nn.Module], int]
    groups: dict[str, list[str]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(_resnet_strip, _RESNET_GROUPS),
    "resnet34": BackboneSpec(_resnet_strip, _RESNET_GROUPS),
    "resnet50": BackboneSpec(_resnet_strip, _RESNET_GROUPS),
    # Groups end where the resolution halves: strides 4, 8, 16, 32.
    "mobilenet_v3_large": BackboneSpec(
        _mobilenet_v3_strip,
        {
            "stage1": _features(0, 1, 2, 3),
            "stage2": _features(4, 5, 6),
            "stage3": _features(7, 8, 9, 10, 11, 12),
            "stage4": [*_features(13, 14, 15, 16), "classifier"],
        },
    ),
    "efficientnet_b0": BackboneSpec(
        _efficientnet_strip,
        {
            "stage1": _features(0, 1, 2),
            "stage2": _features(3),
            "stage3": _features(4, 5),
            "stage4": _features(6, 7, 8),
        },
    ),
}


@dataclass
class Backbone:
    """A feature extractor (images -> (B, feature_dim)) with its layer groups, lowest first."""

    name: str
    model: nn.Module
    feature_dim: int
    groups: dict[str, list[str]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be found, downloaded or fitted to the backbone."""


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(
            f"model.name={name!r} is not a known backbone; choose one of {sorted(BACKBONES)}"
        )
    return BACKBONES[name]


def create_backbone(name: str, weights: str | None = "IMAGENET1K_V1") -> Backbone:
    """Build backbone `name` with `weights`: a torchvision weights name, a local file, or None."""
    spec = backbone_spec(name)
    model = torchvision.models.get_model(name, weights=None)
    feature_dim = spec.strip_classifier(model)
    if weights is not None:
        state = _load_weights(name, str(weights))
        _fit_state_dict(model, state, name, str(weights))
    return Backbone(name, model, feature_dim, spec.groups, spec.mean, spec.std)


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".ckpt", ".bin"))


def _load_weights(name: str, weights: str) -> dict[str, torch.Tensor]:
    if Path(weights).is_file():
        return _read_weights_file(Path(weights), name)
    if _looks_like_path(weights):
        raise WeightsError(f"model.weights={weights!r}: no such file")
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


def _read_weights_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A plain state_dict, or a thaw checkpoint whose backbone weights sit under `backbone.`."""
    from thaw.checkpoint import RUN_KEY, read_checkpoint

    state = read_checkpoint(path)
    trained_as = state.get(RUN_KEY, {}).get("config", {}).get("model", {}).get("name")
    if trained_as is not None and trained_as != name:
        raise WeightsError(
            f"model.weights={str(path)!r} is a checkpoint of model.name={trained_as}, "
            f"but this run has model.name={name}; set model.name={trained_as}"
        )
    if "state_dict" in state:
        prefix = "backbone."
        return {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    return state


def _fit_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str
) -> None:
    """Load `state` into `model`, ignoring only the classifier the backbone no longer has."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or mismatched:
        details = []
        if missing:
            details.append(f"missing keys ({len(missing)}): {missing[:8]}")
        if mismatched:
            details.append(f"mismatched shapes ({len(mismatched)}): {mismatched[:8]}")
        raise WeightsError(
            f"weights {source!r} do not fit backbone {name}: "
            + "; ".join(details)
            + ". Use weights saved from the same architecture (model.name)."
        )
    model.load_state_dict({k: state[k] for k in expected})
