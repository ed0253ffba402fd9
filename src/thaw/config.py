"""Where the configs live, and the config as TensorBoard hyperparameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Groups that describe the experiment (not where files go or how progress is shown).
HPARAM_GROUPS = (
    "data",
    "augment",
    "model",
    "optimizer",
    "scheduler",
    "finetune",
    "trainer",
    "seed",
)


def config_dir() -> Path:
    """conf/ inside the installed package (a wheel), else the repository's conf/ (editable)."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The experiment-defining part of the config, for the TensorBoard hparams tab."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: container[k] for k in HPARAM_GROUPS if k in container}  # type: ignore[index]
