"""The family-agnostic backbone registry: specs by name, and building one with its weights.

Every backbone is named the same way, `stage1` (lowest) to `stage4` (highest), with the classifier
head (`HEAD`) after them, so per-group learning rates, logs (`lr/stage4`) and sweeps compare across
architectures and model families. A family module fills a `BackboneSpec` per model and `register`s
it; weights files and the fit check are shared here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from thaw.checkpoint import RUN_KEY, read_checkpoint

# The name of the classifier head's layer group, which comes after the backbone's stage1..stage4.
HEAD = "head"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights that cannot be found, downloaded or fitted to the backbone."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a model family tells the registry about one backbone.

    `build` returns the randomly initialised model with its classifier stripped, and its feature
    dim; `groups` maps stage1..stage4 to submodule paths, lowest first; `named_weights` returns the
    state_dict of a named pretrained weights value (e.g. "IMAGENET1K_V1") or raises WeightsError.
    """

    build: Callable[[], tuple[nn.Module, int]]
    groups: dict[str, list[str]]
    named_weights: Callable[[str], dict[str, torch.Tensor]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class Backbone:
    """A feature extractor (images -> (B, feature_dim)) with its layer groups, lowest first."""

    name: str
    model: nn.Module
    feature_dim: int
    groups: dict[str, list[str]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


BACKBONES: dict[str, BackboneSpec] = {}


def register(name: str, spec: BackboneSpec) -> None:
    """Make backbone `name` buildable; names are global across families, so a clash is an error."""
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    BACKBONES[name] = spec


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(
            f"model.name={name!r} is not a known backbone; choose one of {sorted(BACKBONES)}"
        )
    return BACKBONES[name]


def create_backbone(name: str, weights: str | None = "IMAGENET1K_V1") -> Backbone:
    """Build backbone `name` with `weights`: a named weights value, a local file, or None."""
    spec = backbone_spec(name)
    model, feature_dim = spec.build()
    if weights is not None:
        state = _load_weights(name, spec, str(weights))
        _fit_state_dict(model, state, name, str(weights))
    return Backbone(name, model, feature_dim, spec.groups, spec.mean, spec.std)


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".ckpt", ".bin"))


def _load_weights(name: str, spec: BackboneSpec, weights: str) -> dict[str, torch.Tensor]:
    """A file wins over a weights name, and a typo'd path says 'no such file', not 'bad name'."""
    if Path(weights).is_file():
        return _read_weights_file(Path(weights), name)
    if _looks_like_path(weights):
        raise WeightsError(f"model.weights={weights!r}: no such file")
    return spec.named_weights(weights)


def _read_weights_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A plain state_dict, or a thaw checkpoint whose backbone weights sit under `backbone.`."""
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
