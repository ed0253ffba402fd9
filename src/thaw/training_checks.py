"""The checks of a training config that need no data, run first: a mistaken learning rate or
epoch count is refused in a second, before data is read or weights are downloaded, instead of
after (or, for some, without) an error deep inside the run.

Only what the builders check too late is checked here; a value the fine-tuning strategy checks
when it is built (which also happens before any data is read) is left to it, past its type.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from thaw import checks
from thaw.errors import UserError
from thaw.models.loss import LOSSES, check_settings
from thaw.openset.extend import HEADS
from thaw.openset.fit import RejectSettings

log = logging.getLogger(__name__)

# The optimizer settings of conf/optimizer/*.yaml, as torch checks them when the optimizer is
# built (which is after the data is read): each number >= 0, each switch a bool (a string such
# as `nesterov=yes` would pass torch as true); `fused` may be null, torch's own default.
OPTIMIZER_NUMBERS = ("lr", "weight_decay", "momentum")
OPTIMIZER_FLAGS = {"nesterov": False, "fused": True}  # name: nullable
# The strategy's numbers, whose ranges it checks itself, with a comparison that a string breaks.
FINETUNE_NUMBERS = {"backbone_lr_ratio": False, "layer_decay": True, "thaw_warmup_epochs": False}
# The data keys that name semi=fixmatch's unlabeled images.
UNLABELED_KEYS = ("unlabeled_root", "unlabeled", "unlabeled_per_class")


def check_training_config(cfg: DictConfig) -> None:
    """Refuse, naming the key and the fix, what would otherwise fail only once data is read."""
    check_optimizer(cfg.optimizer)
    check_finetune(cfg.finetune)
    check_settings(cfg.model.label_smoothing, cfg.model.focal_gamma)
    checks.choice("model.loss", cfg.model.get("loss", "auto"), LOSSES)
    check_length(cfg.trainer)
    RejectSettings.of(cfg.reject)
    check_head(cfg.model)
    check_semi(cfg)


def check_optimizer(optimizer: DictConfig) -> None:
    for key in OPTIMIZER_NUMBERS:
        if key in optimizer:
            checks.number(f"optimizer.{key}", optimizer[key], minimum=0)
    for key, nullable in OPTIMIZER_FLAGS.items():
        if key in optimizer:
            checks.flag(f"optimizer.{key}", optimizer[key], nullable=nullable)


def check_finetune(finetune: DictConfig) -> None:
    for key, nullable in FINETUNE_NUMBERS.items():
        if key in finetune:
            checks.number(f"finetune.{key}", finetune[key], nullable=nullable)
    for group, lr in (finetune.get("group_lrs") or {}).items():
        checks.number(f"finetune.group_lrs.{group}", lr, minimum=0)


def check_semi(cfg: DictConfig) -> None:
    """A semi-supervised run must reach an epoch with unlabeled images; unlabeled images
    without semi-supervision are named as unused."""
    semi, epochs = cfg.get("semi") or {}, cfg.trainer.get("max_epochs")
    pools = [f"data.{key}" for key in UNLABELED_KEYS if cfg.data.get(key) is not None]
    if pools and not semi:
        log.warning("%s: unused without semi=fixmatch", ", ".join(pools))
    start = semi.get("start_epoch", 0)
    if _is_int(start) and _is_int(epochs) and 0 < epochs <= start:
        raise UserError(
            f"semi.start_epoch={start} with trainer.max_epochs={epochs}: every epoch is "
            "supervised warm-up, so no unlabeled image is used. Lower semi.start_epoch or "
            "raise trainer.max_epochs"
        )


def check_length(trainer: DictConfig) -> None:
    """How long the run is: `max_epochs` an integer >= 1, or -1 or null (no end) where
    `max_steps` or `max_time` ends the run. 0 trains nothing (and would test random weights)."""
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if not (_is_int(steps) and (steps == -1 or steps >= 1)):  # -1, Lightning's default: no bound
        raise UserError(
            f"trainer.max_steps must be an integer >= 1, or -1 for no bound, got {steps!r}"
        )
    if _is_int(epochs) and epochs == 0:
        raise UserError(
            "trainer.max_epochs=0 trains nothing: set trainer.max_epochs=1 or more, or run eval.py "
            "ckpt_path=<checkpoint> to test a trained model"
        )
    if _is_int(epochs) and epochs >= 1:
        return
    endless = epochs is None or (_is_int(epochs) and epochs == -1)
    if endless and (steps != -1 or trainer.get("max_time") is not None):
        return
    raise UserError(
        f"trainer.max_epochs must be an integer >= 1, got {epochs!r}: set trainer.max_epochs=<n>"
        " (-1 or null, no end, only where +trainer.max_steps=<n> ends the run)"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_head(model: DictConfig) -> None:
    """`model.head` is new or extend, and extend has a thaw checkpoint to extend."""
    checks.choice("model.head", model.head, HEADS)
    weights = str(model.weights)
    if model.head == "extend" and not (weights.endswith(".ckpt") and Path(weights).is_file()):
        raise UserError(
            f"model.head=extend adds classes to a trained model: model.weights must be its thaw "
            f"checkpoint (a .ckpt file), got {model.weights!r}"
        )
