"""Optimizer parameter groups: a learning rate per layer group (or per block, with layer decay),
no weight decay on bias, norm and 1-D parameters.

All groups exist from the first step; freezing only flips requires_grad, so schedulers, resume
and DDP always see the same optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from thaw.errors import UserError
from thaw.models.backbones import HEAD
from thaw.models.layer_groups import LayerGroup

# A layer group's learning rate, or one per block of the group (layer decay).
Rates = float | list[float]


def discriminative_lrs(
    groups: list[str],
    lr: float,
    backbone_lr_ratio: float,
    group_lrs: Mapping[str, float] | None = None,
) -> dict[str, Rates]:
    """Learning rates for `groups` (lowest first, head last): geometric from `lr * ratio` to `lr`,
    then any explicit `group_lrs` on top."""
    n = len(groups) - 1
    lrs = {g: lr * backbone_lr_ratio ** ((n - i) / n) if n else lr for i, g in enumerate(groups)}
    return _with_group_lrs(lrs, group_lrs)


def layer_decay_lrs(
    blocks_per_group: Mapping[str, int],
    lr: float,
    layer_decay: float,
    group_lrs: Mapping[str, float] | None = None,
) -> dict[str, Rates]:
    """BEiT/MAE layer-wise decay: the head at `lr`, the backbone's top block at
    `lr * layer_decay`, each block below one more factor of `layer_decay`; then any explicit
    `group_lrs` for whole groups on top."""
    total = sum(n for g, n in blocks_per_group.items() if g != HEAD)
    lrs: dict[str, Rates] = {}
    index = 0
    for group, count in blocks_per_group.items():
        if group == HEAD:
            lrs[group] = lr
            continue
        lrs[group] = [lr * layer_decay ** (total - index - k) for k in range(count)]
        index += count
    return _with_group_lrs(lrs, group_lrs)


def _with_group_lrs(
    lrs: dict[str, Rates], group_lrs: Mapping[str, float] | None
) -> dict[str, Rates]:
    for name, value in (group_lrs or {}).items():
        if name not in lrs:
            raise UserError(f"finetune.group_lrs names {name!r}; the groups are {list(lrs)}")
        lrs[name] = float(value)
    return lrs


def build_param_groups(
    layer_groups: Mapping[str, LayerGroup],
    lrs: Mapping[str, Rates],
    weight_decay: float,
) -> list[dict]:
    """Per layer group, or per block where its rates are a list, two optimizer groups (with and
    without weight decay), each tagged with its layer `group` and a `name` for logs (the group,
    or `stage3/block07`, numbered across the backbone)."""
    param_groups = []
    index = 0
    for group, layer in layer_groups.items():
        rates = lrs[group]
        if isinstance(rates, Sequence):
            units = [
                (f"{group}/block{index + k:02d}", [block], rate)
                for k, (block, rate) in enumerate(zip(layer.blocks, rates, strict=True))
            ]
        else:
            units = [(group, layer.blocks, rates)]
        index += len(layer.blocks)
        for name, blocks, rate in units:
            params = [p for block in blocks for p in block.values()]
            decay = [p for p in params if id(p) not in layer.no_decay]
            no_decay = [p for p in params if id(p) in layer.no_decay]
            for chosen, wd in ((decay, weight_decay), (no_decay, 0.0)):
                if chosen:
                    param_groups.append(
                        {
                            "params": chosen,
                            "lr": rate,
                            "weight_decay": wd,
                            "name": name,
                            "group": group,
                        }
                    )
    return param_groups
