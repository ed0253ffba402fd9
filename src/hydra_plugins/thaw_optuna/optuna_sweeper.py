"""thaw's Optuna sweeper for Hydra (`hydra/sweeper=optuna`). Hydra finds plugins only in the
hydra_plugins namespace, so the class lives here; the search itself is thaw.search.study.
Optuna is imported when a search starts, not when Hydra scans its plugins on every run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from thaw.errors import UserError


class OptunaSweeper(Sweeper):
    """Optuna ≥ 4 behind Hydra's sweeper interface, with LHT's keys (see conf/hydra/sweeper)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from thaw.search.study import SearchSettings, search

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        plain = {
            key: OmegaConf.to_container(value, resolve=True)
            if isinstance(value, DictConfig)
            else value
            for key, value in self.settings.items()
        }
        plain["params"] = plain.get("params") or {}
        known = [field.name for field in dataclasses.fields(SearchSettings)]
        unknown = sorted(set(plain) - set(known))
        if unknown:
            raise UserError(
                f"unknown hydra.sweeper keys {unknown}; the Optuna sweeper's are {known}"
            )
        search(self.launcher, SearchSettings(**plain), sweep_dir, arguments)
