"""The family-agnostic backbone registry: a spec per (family, name), and building one with weights.

Every backbone is cut the same way, `stage1` (lowest) to `stage4` (highest), with the classifier
head (`HEAD`) after them, so per-group learning rates, logs (`lr/stage4`) and sweeps compare across
architectures and model families. A family is a module of this package (`torchvision`, `timm`),
imported when first asked for, with a `backbone_spec(name, weights)` function; weights files, the
checkpoint-as-weights path and the fit check are shared here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from thaw.checkpoint import MODEL_PREFIX, RUN_KEY, read_checkpoint
from thaw.errors import UserError
from thaw.models.layer_groups import Block
from thaw.models.stem import set_stem_stride

# The name of the classifier head's layer group, which comes after the backbone's stage1..stage4.
HEAD = "head"
STAGES = ("stage1", "stage2", "stage3", "stage4")
FAMILIES = ("torchvision", "timm")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(UserError):
    """Pretrained weights that cannot be found, downloaded or fitted to the backbone."""


@dataclass
class Backbone:
    """A feature extractor (images -> (B, feature_dim) pooled pre-logits features) cut into
    blocks, lowest first, each in one of the stages stage1..stage4."""

    name: str
    model: nn.Module
    feature_dim: int
    blocks: list[Block]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    no_weight_decay: frozenset[str] = frozenset()  # names or patterns, e.g. a ViT's pos_embed

    @property
    def groups(self) -> dict[str, list[str]]:
        """stage -> its parameter names, lowest stage first."""
        groups: dict[str, list[str]] = {}
        for block in self.blocks:
            groups.setdefault(block.stage, []).extend(block.params)
        return groups


def identity_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return state


@dataclass(frozen=True)
class BackboneSpec:
    """What a model family tells the registry about one backbone.

    `build(input_size)` returns the randomly initialised Backbone (a ViT is built for that input
    size; convolutional models ignore it); `named_weights(weights)` returns the state_dict of a
    named pretrained weights value or raises WeightsError; `adapt_weights(state, model)` converts
    a weights file to this model (e.g. resamples a ViT's position embedding to its input size).
    `input_size` is the side the weights were trained at (`data.image_size=auto`), and
    `architecture` what a weights file must have been trained as.
    """

    build: Callable[[int], Backbone]
    named_weights: Callable[[str], dict[str, torch.Tensor]]
    architecture: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    adapt_weights: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] = field(
        default=identity_filter
    )


def backbone_spec(
    name: str, weights: str | None = None, family: str = "torchvision"
) -> BackboneSpec:
    """The spec of backbone `name` of `family` (its preprocessing may depend on `weights`)."""
    if family not in FAMILIES:
        raise UserError(f"model.family={family!r} is not one of {list(FAMILIES)}")
    module = importlib.import_module(f"thaw.models.backbones.{family}")
    return module.backbone_spec(name, None if weights is None else str(weights))


def create_backbone(
    name: str,
    weights: str | None = "IMAGENET1K_V1",
    family: str = "torchvision",
    input_size: int = 224,
    stem_stride: int | None = None,
) -> Backbone:
    """Build backbone `name` for `input_size` px with `weights`: a named weights value, a local
    file (a state_dict, .safetensors, or a thaw checkpoint), or None; `stem_stride` (1 or 2)
    shrinks its stem's downsampling (see thaw.models.stem)."""
    spec = backbone_spec(name, weights, family)
    backbone = spec.build(input_size)
    if stem_stride is not None:
        set_stem_stride(backbone.model, stem_stride, name)
    if weights is not None:
        state = spec.adapt_weights(_load_weights(spec, str(weights)), backbone.model)
        _fit_state_dict(backbone.model, state, name, str(weights))
    return backbone


def looks_like_path(weights: str) -> bool:
    """Whether a model.weights value means a file, not a weights name."""
    suffixes = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
    return "/" in weights or "\\" in weights or weights.endswith(suffixes)


def _load_weights(spec: BackboneSpec, weights: str) -> dict[str, torch.Tensor]:
    """A file wins over a weights name, and a typo'd path says 'no such file', not 'bad name'."""
    if Path(weights).is_file():
        return _read_weights_file(Path(weights), spec.architecture)
    if looks_like_path(weights):
        raise WeightsError(f"model.weights={weights!r}: no such file")
    return spec.named_weights(weights)


def _read_weights_file(path: Path, architecture: str) -> dict[str, torch.Tensor]:
    """A plain state_dict (.pth, .safetensors), or a thaw checkpoint whose backbone weights sit
    under `model.backbone.` (read_checkpoint upgrades older ones); anything else is a
    WeightsError naming the file."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise WeightsError(
                f"model.weights={str(path)!r} is not a readable .safetensors file ({err})"
            ) from err
    state = read_checkpoint(path)
    record = state.get(RUN_KEY)
    model = record.get("config", {}).get("model", {}) if isinstance(record, dict) else {}
    trained_as = model.get("name")
    if trained_as is not None and trained_as.partition(".")[0] != architecture:
        raise WeightsError(
            f"model.weights={str(path)!r} is a checkpoint of model.name={trained_as}, "
            f"but this run's model is {architecture}; set model.name={trained_as}"
        )
    if isinstance(state.get("state_dict"), dict):
        prefix = MODEL_PREFIX + "backbone."
        weights = state["state_dict"].items()
        state = {k[len(prefix) :]: v for k, v in weights if k.startswith(prefix)}
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(
            f"model.weights={str(path)!r} is not a state_dict: {not_tensors[:3]} hold no "
            "tensors. Give a file saved with torch.save(model.state_dict()) or a thaw checkpoint"
        )
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
