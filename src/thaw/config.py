"""Where the configs live, and the config as TensorBoard hyperparameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

# Groups that describe the experiment (not where files go or how progress is shown).
HPARAM_GROUPS = (
    "data",
    "augment",
    "model",
    "optimizer",
    "scheduler",
    "finetune",
    "semi",
    "trainer",
    "seed",
)


# Overrides for runs whose progress nobody watches (tests): no progress bars or model summary.
SILENT = [
    "++callbacks.progress=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]
# Overrides for the runs a script launches one after another (the benchmarks'): silent, no batch
# preview, no logger, no evaluation report.
QUIET = [*SILENT, "++callbacks.batch_preview=null", "logger=none", "report=false"]


def config_dir() -> Path:
    """conf/ inside the installed package (a wheel), else the repository's conf/ (editable)."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def script_arguments(
    argv: list[str], own: dict[str, str | None]
) -> tuple[dict[str, str | None], list[str]]:
    """A script's command line: its `own` keys (key=value, defaults given) and the rest, the
    config overrides it passes on."""
    values, overrides = dict(own), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in values:
            values[key] = value
        else:
            overrides.append(arg)
    return values, overrides


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The experiment-defining part of the config, for the TensorBoard hparams tab."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: container[k] for k in HPARAM_GROUPS if k in container}  # type: ignore[index]


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/<name>.yaml with `overrides` as `python <name>.py` would, outside a Hydra
    app (tests, benchmark scripts), writing into `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent / "logs")
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # as in a real app, whose task function sees no `hydra` node
    return cfg
