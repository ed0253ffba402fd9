"""An Optuna search over Hydra jobs that survives: the study lives in SQLite in the sweep dir,
a rerun resumes it, a trial that fails or returns NaN is recorded as FAIL and the search goes
on, and weak trials are pruned. The Hydra plugin (hydra_plugins.thaw_optuna) calls `search`."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.utils import instantiate
from optuna.trial import TrialState

from thaw import checks
from thaw.errors import UserError
from thaw.search import STUDY_FILE
from thaw.search.space import as_overrides, search_space

log = logging.getLogger(__name__)

PRUNING_CALLBACK = "thaw.search.pruning.OptunaPruning"


@dataclass(frozen=True)
class SearchSettings:
    """The sweeper's config (`hydra.sweeper.*`); the sampler and pruner as configs (`_target_`)."""

    study_name: str
    direction: str
    n_trials: int
    n_jobs: int
    sampler: Mapping[str, Any] | None
    pruner: Mapping[str, Any] | None
    monitor: str
    params: Mapping[str, Any]
    storage: str | None = None


def storage_url(settings: SearchSettings, sweep_dir: Path) -> str:
    """The study's storage: `hydra.sweeper.storage`, or SQLite at <sweep dir>/optuna.db."""
    return settings.storage or f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"


def search(
    launcher: Launcher, settings: SearchSettings, sweep_dir: Path, arguments: Sequence[str]
) -> optuna.Study:
    """Run trials until the study holds `n_trials` (earlier runs' trials count), `n_jobs` at a
    time through the launcher. Job k of the launch is trial k: its run dir is named by the trial
    number, so a resumed search never writes into an earlier trial's dir."""
    for name, value in (("n_trials", settings.n_trials), ("n_jobs", settings.n_jobs)):
        checks.integer(f"hydra.sweeper.{name}", value, minimum=1)
    space, fixed = search_space(settings.params, arguments)
    if not space:
        raise UserError(
            "the Optuna search has nothing to search: give hydra.sweeper.params ranges, e.g. "
            "\"hydra.sweeper.params.optimizer.lr='tag(log, interval(1e-4, 1e-2))'\""
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = storage_url(settings, sweep_dir)
    study = optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        direction=settings.direction,
        load_if_exists=True,
    )
    study.sampler = _sampler(settings.sampler, len(study.get_trials(deepcopy=False)))
    _requeue_interrupted(study)
    done = len(counted(study))
    if done:
        log.info(
            "Resuming study %r in %s: %d of %d trials done",
            study.study_name,
            storage,
            done,
            settings.n_trials,
        )
    while (remaining := settings.n_trials - len(counted(study))) > 0:
        trials = [study.ask(space) for _ in range(min(settings.n_jobs, remaining))]
        overrides = [
            [*fixed, *as_overrides(t.params), _pruning_override(storage, settings, t.number)]
            for t in trials
        ]
        returns = launcher.launch(overrides, initial_job_idx=trials[0].number)
        for trial, job in zip(trials, returns, strict=True):
            record_trial(study, trial, job)
    _log_best(study)
    return study


def _sampler(config: Mapping[str, Any] | None, trials: int) -> optuna.samplers.BaseSampler:
    """The configured sampler; its seed moves on by the trials already in the study, so a
    resumed search draws new points (the same seed would repeat the first run's) and is still
    reproducible."""
    if not config:
        return optuna.samplers.TPESampler()
    config = dict(config)
    if config.get("seed") is not None:
        config["seed"] = int(config["seed"]) + trials
    return instantiate(config)


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards n_trials: every ended one but those interrupted."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and not t.user_attrs.get("interrupted")
    ]


def _requeue_interrupted(study: optuna.Study) -> None:
    """A trial still RUNNING when a search starts was cut off (a crash, a pre-emption): mark it
    FAIL, not counted, and queue its parameters to run again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("Trial %d was interrupted; it runs again as a new trial", trial.number)
        live = optuna.trial.Trial(
            study, trial._trial_id
        )  # Optuna's handle for another process's trial
        live.set_user_attr("interrupted", True)
        live.set_user_attr("error", "interrupted: the search stopped while it ran")
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)


def _pruning_override(storage: str, settings: SearchSettings, number: int) -> str:
    """The callback that reports `monitor` to this trial each epoch and asks the configured
    pruner (the job reads it from its own hydra.sweeper config) whether to stop."""
    return (
        f"+callbacks.optuna_pruning={{_target_:{PRUNING_CALLBACK},storage:'{storage}',"
        f"study_name:'{settings.study_name}',trial_number:{number},monitor:'{settings.monitor}',"
        "pruner:${hydra:sweeper.pruner}}"
    )


def record_trial(study: optuna.Study, trial: optuna.trial.Trial, job: JobReturn) -> None:
    """Tell the study how the trial's job ended: COMPLETE with its value, PRUNED, or FAIL with
    the error (an exception, or a value that is not a finite number)."""
    run_dir = job.hydra_cfg.hydra.runtime.output_dir if job.hydra_cfg else None
    if run_dir:
        trial.set_user_attr("run_dir", str(run_dir))
    # JobReturn.return_value re-raises a failed job's exception (and prints it); read it as is.
    value = job._return_value
    if isinstance(value, optuna.TrialPruned):
        study.tell(trial, state=TrialState.PRUNED)
        log.info("Trial %d PRUNED (%s)", trial.number, value)
        return
    if job.status != JobStatus.COMPLETED:  # any error of the trial's run: the search goes on
        _fail(study, trial, f"{type(value).__name__}: {value}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(study, trial, f"the run returned {value!r}, not a finite optimized_metric")
        return
    study.tell(trial, float(value))
    log.info(
        "Trial %d COMPLETE: %s (best so far: trial %d, %s)",
        trial.number,
        value,
        study.best_trial.number,
        study.best_value,
    )


def _fail(study: optuna.Study, trial: optuna.trial.Trial, error: str) -> None:
    trial.set_user_attr("error", error)
    study.tell(trial, state=TrialState.FAIL)
    log.warning("Trial %d FAIL: %s; the search goes on", trial.number, error)


def _log_best(study: optuna.Study) -> None:
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        log.info("Best trial %d: %s with %s", best.number, best.value, best.params)
    else:
        log.warning("No trial of study %r completed", study.study_name)
