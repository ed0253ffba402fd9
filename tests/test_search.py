"""Optuna searches that survive (SQLite, resume, failures, pruning) and the sweep report, run as
a user runs them: `python train.py hparams_search=...` in a subprocess."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from conftest import TINY, offline_fmnist
from thaw.search.study import record_trial

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD_PRUNER = [  # prunes every trial at its first report: val/acc is always below 1.1
    "~hydra.sweeper.pruner",
    "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:1.1}",
]


def search(fmnist_root: Path, sweep_dir: Path, n_trials: int, *overrides: str) -> str:
    """Run the fmnist_transfer search preset on the tiny generated data; its console output."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "hparams_search=fmnist_transfer",
        *TINY,
        *offline_fmnist(fmnist_root),
        "data.samples_per_class=null",
        "data.val_fraction=0.25",
        "trainer.max_epochs=1",
        # One epoch only thaws with freeze_epochs=0 (the preset samples 0, 1, 2 or 4).
        "hydra.sweeper.params={finetune.freeze_epochs:'choice(0)'}",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.n_trials={n_trials}",
        *overrides,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    return optuna.load_study(study_name="fmnist_transfer", storage=storage).trials


def report_rows(sweep_dir: Path) -> dict[str, dict[str, str]]:
    with (sweep_dir / "sweep.csv").open() as file:
        return {row["job"]: row for row in csv.DictReader(file)}


@pytest.fixture(scope="module")
def first_search(fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("search") / "fmnist_transfer"
    search(fmnist_root, sweep_dir, 3)
    return sweep_dir


def test_a_search_keeps_its_trials_in_sqlite_and_reports_them(first_search):
    found = trials(first_search)
    assert [t.state for t in found] == [TrialState.COMPLETE] * 3
    assert len({tuple(sorted(t.params.items())) for t in found}) == 3
    rows = report_rows(first_search)
    assert list(rows) == sorted(rows, key=lambda job: -float(rows[job]["value"]))  # best first
    for trial in found:
        run_dir = first_search / f"trial_{trial.number}"  # named by the trial, not the job
        metrics = json.loads((run_dir / "metrics.json").read_text())
        row = rows[f"trial {trial.number}"]
        assert row["state"] == "COMPLETE" and row["run_dir"] == str(run_dir)
        assert float(row["value"]) == trial.value == metrics["val/acc_best"]
        assert float(row["test/acc"]) == metrics["test/acc"]
        assert int(row["epochs"]) == 1 and float(row["wall_time_s"]) == metrics["train/wall_time_s"]
        assert f"optimizer.lr={trial.params['optimizer.lr']!r}" in row["overrides"]
    assert (first_search / "optimization_history.png").stat().st_size > 1000
    assert (first_search / "param_importances.png").stat().st_size > 1000
    assert "| 1 | trial " in (first_search / "sweep.md").read_text()


def test_a_rerun_resumes_the_study_prunes_and_survives_failures(first_search, fmnist_root):
    first_metrics = (first_search / "trial_0" / "metrics.json").read_bytes()
    storage = f"sqlite:///{first_search / 'optuna.db'}"
    study = optuna.load_study(study_name="fmnist_transfer", storage=storage)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    cut_off = study.ask({"optimizer.lr": lr})  # trial 3 stays RUNNING, as a killed search leaves it
    study.enqueue_trial({"model.head_dropout": 2.0})  # trial 4 will fail: not a probability

    output = search(
        fmnist_root,
        first_search,
        6,
        "+hydra.sweeper.params.model.head_dropout='interval(0.0, 0.5)'",  # quoted: a string
        *THRESHOLD_PRUNER,
    )
    found = trials(first_search)
    assert [t.state for t in found] == [TrialState.COMPLETE] * 3 + [
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.PRUNED,
        TrialState.PRUNED,
    ]
    assert found[3].user_attrs["interrupted"] and "interrupted" in found[3].user_attrs["error"]
    assert "dropout" in found[4].user_attrs["error"] and "Trial 4 FAIL" in output
    assert found[5].params["optimizer.lr"] == cut_off.params["optimizer.lr"]  # run again
    assert len(found[6].intermediate_values) == 1  # stopped after its first epoch
    assert not (first_search / "trial_6" / "metrics.json").exists()
    assert (first_search / "trial_0" / "metrics.json").read_bytes() == first_metrics

    rows = report_rows(first_search)
    assert [rows[f"trial {n}"]["state"] for n in range(7)] == [
        "COMPLETE", "COMPLETE", "COMPLETE", "FAIL", "FAIL", "PRUNED", "PRUNED"
    ]  # fmt: skip
    assert "dropout" in rows["trial 4"]["error"] and rows["trial 4"]["value"] == ""
    assert list(rows)[:3] == sorted(list(rows)[:3], key=lambda j: -float(rows[j]["value"]))


@pytest.mark.parametrize("value", [float("nan"), None])
def test_a_trial_that_returns_no_finite_metric_is_a_failure(value):
    """What the sweeper records for a job that ended without error but returned NaN (a loss
    that diverged) or nothing: FAIL, with the value in its error."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask({"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)})
    job = JobReturn(status=JobStatus.COMPLETED, _return_value=value)
    record_trial(study, trial, job)
    (ended,) = study.trials
    assert ended.state == TrialState.FAIL
    assert repr(value) in ended.user_attrs["error"] and "finite" in ended.user_attrs["error"]
