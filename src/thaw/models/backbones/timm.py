"""The timm family: any timm model, cut into stage1..stage4 by its own `group_matcher`.

timm's layer-decay helper orders a model's parameters with `model.group_matcher()`: the stem
first, then the blocks or stages in order. thaw does the same. The coarse grouping (whole
stages of a ConvNeXt, blocks of a ViT) is split into four runs of about equal length, with the
stem in the lowest. Parameters the matcher leaves out (a ConvNeXt's pooled-feature norm, a
MobileNetV3's 1x1 head conv) feed the classifier and go with the highest stage. The fine
grouping (every block) is the unit of `finetune.layer_decay`.

Preprocessing comes from the weights' `pretrained_cfg` (mean, std, native input size), and a
model with a fixed input size (a ViT) is built for the data's resolution through `img_size=`,
its position embedding resampled from the pretrained one by timm's own checkpoint filter.
"""

from __future__ import annotations

import difflib
import re
import sys
from functools import partial
from pathlib import Path

import timm
import torch
from huggingface_hub import constants as hub
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

from thaw.errors import UserError
from thaw.models.backbones.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STAGES,
    Backbone,
    BackboneSpec,
    WeightsError,
    looks_like_path,
)
from thaw.models.layer_groups import Block

Triple = tuple[float, float, float]

# model.weights: the pretrained weights model.name names (its tag, or timm's default tag).
PRETRAINED = "pretrained"


def backbone_spec(name: str, weights: str | None) -> BackboneSpec:
    """The spec of timm model `name` (`arch` or `arch.tag`); a tag in `weights` takes over the
    name's, so the preprocessing is that of the weights loaded."""
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise UserError(_unknown_model(arch))
    is_file = weights is not None and (Path(weights).is_file() or looks_like_path(weights))
    if weights not in (None, PRETRAINED) and not is_file:
        tag = weights
    full = f"{arch}.{tag}" if tag else arch
    try:
        cfg = get_pretrained_cfg(full)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        tags = timm.list_pretrained(f"{arch}.*")
        raise UserError(
            f"{tag!r} is not a pretrained tag of timm model {arch}; its tags: {tags}. Set "
            f"model.weights to one of them, {PRETRAINED}, a weights file, or null"
        ) from None
    fixed_size = bool(cfg and cfg.fixed_input_size)
    mean = tuple(cfg.mean) if cfg else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg else IMAGENET_STD
    return BackboneSpec(
        build=partial(_build, full, fixed_size, mean, std),
        named_weights=partial(_named_weights, full, fixed_size),
        architecture=arch,
        mean=mean,
        std=std,
        input_size=cfg.input_size[-1] if cfg else 224,
        adapt_weights=_checkpoint_filter,
    )


def _unknown_model(arch: str) -> str:
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    pattern = re.sub(r"[^a-z0-9]+", "*", arch.lower()).strip("*")
    similar = timm.list_models(f"*{pattern}*")[:5]
    suggestions = list(dict.fromkeys(close + similar))
    return (
        f"model.name={arch!r} is not a timm model; close matches: {suggestions or 'none'}. "
        f"List them with timm.list_models('*{pattern}*')"
    )


def _create(full: str, fixed_size: bool, input_size: int | None, pretrained: bool) -> nn.Module:
    """The timm model without its classifier: model(x) gives pooled pre-logits features."""
    size = {"img_size": input_size} if fixed_size and input_size else {}
    return timm.create_model(full, pretrained=pretrained, num_classes=0, **size)


def _build(full: str, fixed_size: bool, mean: Triple, std: Triple, input_size: int) -> Backbone:
    model = _create(full, fixed_size, input_size, pretrained=False)
    if not hasattr(model, "group_matcher"):
        raise UserError(
            f"timm model {full} has no group_matcher(): thaw cannot cut it into layer groups"
        )
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(full, model, feature_dim, derive_blocks(model), mean, std, frozenset(nwd))


def derive_blocks(model: nn.Module) -> list[Block]:
    """The model's fine blocks, lowest first, each in its stage (see the module docstring)."""
    names = [n for n, _ in model.named_parameters()]
    coarse = _layer_ids(names, model.group_matcher(coarse=True))
    fine = _layer_ids(names, model.group_matcher(coarse=False))
    matched = _matched(names, model.group_matcher(coarse=True))
    stem = set(_matched(names, {"stem": model.group_matcher(coarse=True).get("stem")}))
    body = sorted({coarse[n] for n in names if n in matched and n not in stem})
    if len(body) < len(STAGES):  # fewer stages than four: split the fine blocks instead
        coarse = fine
        body = sorted({fine[n] for n in names if n in matched and n not in stem})
    if len(body) < len(STAGES):
        raise UserError(f"timm model has {len(body)} blocks, fewer than {len(STAGES)} stages")
    chunks = _split(body, len(STAGES))
    stage_of_layer = {layer: STAGES[i] for i, chunk in enumerate(chunks) for layer in chunk}

    def stage(name: str) -> str:
        if name in stem:
            return STAGES[0]
        if name not in matched:
            return STAGES[-1]
        return stage_of_layer[coarse[name]]

    by_block: dict[tuple[int, float], list[str]] = {}
    for name in names:
        key = (STAGES.index(stage(name)), fine[name] if name in matched else float("inf"))
        by_block.setdefault(key, []).append(name)
    return [Block(STAGES[s], tuple(by_block[(s, f)])) for s, f in sorted(by_block)]


def _split(items: list[int], parts: int) -> list[list[int]]:
    """`items` in `parts` runs in order, lengths differing by at most one (longer runs first)."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        runs.append(items[start:end])
        start = end
    return runs


def _layer_ids(names: list[str], matcher: dict) -> dict[str, int]:
    from timm.models._manipulate import group_with_matcher

    return group_with_matcher(((n, None) for n in names), matcher, reverse=True)


def _matched(names: list[str], matcher: dict) -> set[str]:
    """The names some pattern of `matcher` (timm's dict form) matches."""
    patterns = []
    for spec in matcher.values():
        if isinstance(spec, str):
            patterns.append(spec)
        elif spec:
            patterns.extend(entry[0] for entry in spec)
    return {n for n in names if any(re.match(p, n) for p in patterns)}


def _checkpoint_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own conversion of a weights file to `model`, where its module has one (a ViT's
    resamples the position embedding to the model's input size)."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    return filter_fn(state, model) if filter_fn else state


def _named_weights(full: str, fixed_size: bool, weights: str) -> dict[str, torch.Tensor]:
    """The state_dict of the pretrained weights of `full`, from the Hugging Face hub (or its
    cache), at timm's native size: the filter then fits it to the model's."""
    try:
        model = _create(full, fixed_size, None, pretrained=True)
    except OSError as err:  # huggingface_hub's "not found, not cached" is an OSError
        repo = get_pretrained_cfg(full).hf_hub_id or f"timm/{full}"
        raise WeightsError(
            f"could not download the timm weights of {full} from the Hugging Face hub "
            f"(repo {repo}): {err}\n"
            f"Fixes: place model.safetensors of {repo} in the Hugging Face hub cache, "
            f"{hub.HF_HUB_CACHE} (set HF_HOME to move it): run `hf download {repo} "
            f"model.safetensors` where there is a network and copy that folder here; or set "
            f"model.weights=/path/to/model.safetensors (from https://huggingface.co/{repo}), "
            f"or model.weights=null to train from random init."
        ) from err
    except RuntimeError as err:  # timm: "No pretrained weights exist for ..."
        raise WeightsError(
            f"timm has no pretrained weights for {full} ({err}); pretrained ones: "
            f"{timm.list_pretrained(full.partition('.')[0] + '*')[:8]}"
        ) from err
    return model.state_dict()
