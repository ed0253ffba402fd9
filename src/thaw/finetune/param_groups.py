"""Optimizer parameter groups: one learning rate per layer group, no weight decay on bias and norm.

All groups exist from the first step; freezing only flips requires_grad, so schedulers, resume
and DDP always see the same optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def discriminative_lrs(
    groups: list[str],
    lr: float,
    backbone_lr_ratio: float,
    group_lrs: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Learning rates for `groups` (lowest first, head last): geometric from `lr * ratio` to `lr`,
    then any explicit `group_lrs` on top."""
    n = len(groups) - 1
    lrs = {g: lr * backbone_lr_ratio ** ((n - i) / n) if n else lr for i, g in enumerate(groups)}
    for name, value in (group_lrs or {}).items():
        if name not in lrs:
            raise ValueError(f"finetune.group_lrs names {name!r}; the groups are {groups}")
        lrs[name] = float(value)
    return lrs


def _no_decay(name: str, param: nn.Parameter, norm_params: set[int]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or id(param) in norm_params


def build_param_groups(
    layer_groups: Mapping[str, list[nn.Module]],
    lrs: Mapping[str, float],
    weight_decay: float,
) -> list[dict]:
    """Two optimizer groups per layer group (with and without weight decay), each tagged `name`."""
    param_groups = []
    for group, modules in layer_groups.items():
        norm_params = {
            id(p)
            for m in modules
            for sub in m.modules()
            if isinstance(sub, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm)
            for p in sub.parameters(recurse=False)
        }
        decay, no_decay = [], []
        for module in modules:
            for name, param in module.named_parameters():
                (no_decay if _no_decay(name, param, norm_params) else decay).append(param)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                param_groups.append(
                    {"params": params, "lr": lrs[group], "weight_decay": wd, "name": group}
                )
    return param_groups
