"""Layer groups by parameter: the unit of freezing (a stage) and of layer-wise LR decay (a block).

A group is a set of parameters, not of submodules, because timm puts some of a stage's
parameters straight on the root model (a ViT's `cls_token` and `pos_embed` sit beside the
`blocks` they feed). The modules whose every parameter is in one group switch between train and
eval mode with it, so a frozen stage's BatchNorm statistics and dropout stay fixed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Block:
    """The finest unit a backbone is cut into, lowest first: its stage and parameter names."""

    stage: str
    params: tuple[str, ...]


@dataclass
class LayerGroup:
    """One stage (or the head): its parameters per block, which of them take no weight decay,
    and the largest submodules wholly inside it."""

    blocks: list[dict[str, nn.Parameter]]
    no_decay: frozenset[int]  # ids of bias, norm and 1-D parameters, and the model's own list
    modules: list[nn.Module]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for block in self.blocks for p in block.values()]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and every buffer (BatchNorm statistics) of the group, by name."""
        named = {name: p for block in self.blocks for name, p in block.items()}
        for i, module in enumerate(self.modules):
            named |= {f"<{i}>.{k}": v for k, v in module.named_buffers()}
        return named


def blocks_from_paths(model: nn.Module, stages: dict[str, list[str]]) -> list[Block]:
    """One block per stage, from the submodule paths each stage lists (hand-cut backbones)."""
    return [
        Block(stage, tuple(n for path in paths for n, _ in _named(model, path)))
        for stage, paths in stages.items()
    ]


def _named(model: nn.Module, path: str) -> list[tuple[str, nn.Parameter]]:
    return list(model.get_submodule(path).named_parameters(prefix=path))


def build_layer_groups(
    model: nn.Module,
    blocks: list[Block],
    no_weight_decay: Collection[str] = (),
) -> dict[str, LayerGroup]:
    """The stages of `model` (parameter names relative to it) as LayerGroups, lowest first.

    `no_weight_decay` holds names or fnmatch patterns (timm's `model.no_weight_decay()`, e.g. a
    ViT's position embedding) that take no weight decay besides bias, norm and 1-D parameters.
    """
    named = dict(model.named_parameters())
    stage_of = {name: block.stage for block in blocks for name in block.params}
    unassigned = sorted(set(named) - set(stage_of))
    if unassigned:
        raise ValueError(f"backbone parameters in no layer group: {unassigned[:8]}")
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(False)
    }
    groups: dict[str, LayerGroup] = {}
    for block in blocks:
        group = groups.setdefault(block.stage, LayerGroup([], frozenset(), []))
        group.blocks.append({n: named[n] for n in block.params})
        group.no_decay |= {
            id(named[n])
            for n in block.params
            if named[n].ndim <= 1
            or n.endswith(".bias")
            or id(named[n]) in norm_params
            or any(fnmatch.fnmatch(n, pattern) for pattern in no_weight_decay)
        }
    for name, module in _whole_modules(model, stage_of):
        first = next(n for n, _ in module.named_parameters(prefix=name))
        groups[stage_of[first]].modules.append(module)
    return groups


def single_group(module: nn.Module, name: str) -> LayerGroup:
    """`module` as one group of one block (the classifier head)."""
    block = Block(name, tuple(n for n, _ in module.named_parameters()))
    return build_layer_groups(module, [block])[name]


def _whole_modules(model: nn.Module, stage_of: dict[str, str]) -> list[tuple[str, nn.Module]]:
    """The largest submodules (the model itself included) whose parameters, at least one, all
    belong to one stage."""
    found: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module) -> None:
        stages = {stage_of[f"{name}.{n}" if name else n] for n, _ in module.named_parameters()}
        if len(stages) == 1:
            found.append((name, module))
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found
