"""Known noise in every run, silenced where it is emitted and nowhere else: each filter names
one message of one library, so any other warning still shows."""

from __future__ import annotations

import logging
import warnings

# Lightning (2.6) prints an advertisement for its cloud logger whenever a Trainer is built.
_LIGHTNING_TIP = "💡 Tip:"


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_TIP)


def silence_known_noise() -> None:
    """Drop the litlogger tip, the deprecation torch (>= 2.10) raises for the `LeafSpec()`
    that Lightning's own `_pytree` helper still builds for every dataloader, and Lightning's
    question whether the training task's skip of a one-image batch was on purpose (it is: see
    ClassificationTask.training_step). Idempotent."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTip) for f in logger.filters):
        logger.addFilter(_DropLightningTip())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        module=r"pytorch_lightning\.utilities\._pytree",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"`training_step` returned `None`",
        module=r"pytorch_lightning\.loops\.optimization\.automatic",
    )
