"""The Lightning side of an Optuna search: a trial reports its validation metric every epoch
to the study (in the search's SQLite file), and stops when the study's pruner says so."""

from __future__ import annotations

import optuna
import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info


class OptunaPruning(pl.Callback):
    """Added by the Optuna sweeper to each trial's callbacks (`callbacks.optuna_pruning`).

    After each validation it reports `monitor` at step = epoch, and raises `optuna.TrialPruned`
    when the pruner stops the trial; the sweeper records it as PRUNED. Under DDP rank 0 reports
    and asks, and every rank raises together.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        monitor: str,
        pruner: optuna.pruners.BasePruner | None,
    ) -> None:
        self.storage, self.study_name = storage, study_name
        self.trial_number, self.monitor = trial_number, monitor
        self.pruner = pruner or optuna.pruners.NopPruner()
        self._trial: optuna.trial.Trial | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            study = optuna.load_study(
                study_name=self.study_name, storage=self.storage, pruner=self.pruner
            )
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            frozen = next(t for t in running if t.number == self.trial_number)
            # Optuna's way to act for a trial asked in another process: Trial(study, trial_id).
            self._trial = optuna.trial.Trial(study, frozen._trial_id)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        prune, value = False, trainer.callback_metrics.get(self.monitor)
        if self._trial is not None and value is not None:
            self._trial.report(float(value), step=epoch)
            prune = self._trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            message = f"pruned after epoch {epoch}: {self.monitor}={float(value):.4f}"
            rank_zero_info(f"Optuna trial {self.trial_number} {message}")
            raise optuna.TrialPruned(message)
