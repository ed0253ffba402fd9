"""Reading checkpoints safely, and what a thaw checkpoint carries besides weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The key under which a thaw checkpoint carries its composed config and class names.
RUN_KEY = "thaw"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not what the caller needs."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with `weights_only` (no arbitrary code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"could not read checkpoint {path}: it is truncated, corrupt, or not a torch "
            f"checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err


def run_info(checkpoint: dict[str, Any], path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The composed config and the class names a thaw checkpoint was trained with."""
    if RUN_KEY not in checkpoint:
        raise CheckpointError(
            f"{path} is not a thaw checkpoint (it has no {RUN_KEY!r} entry with config and classes)"
        )
    info = checkpoint[RUN_KEY]
    return info["config"], list(info["classes"])


def check_resumable(path: str | Path, model_name: str, classes: list[str]) -> None:
    """Fail before training when `path` cannot continue this run: another model or classes."""
    config, saved_classes = run_info(read_checkpoint(path), path)
    saved_model = config["model"]["name"]
    if saved_model != model_name:
        raise CheckpointError(
            f"ckpt_path={path} was trained with model.name={saved_model}, "
            f"but this run has model.name={model_name}"
        )
    if saved_classes != classes:
        raise CheckpointError(
            f"ckpt_path={path} was trained on {len(saved_classes)} classes {saved_classes}, "
            f"but this run's data has {len(classes)}: {classes}"
        )
