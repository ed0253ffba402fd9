"""The sweep report: after every multirun (grid or Optuna), and on demand with
`python scripts/sweep_report.py <sweep dir>`, one row per job or trial in sweep.csv and
sweep.md, best first; mean ± std across K-fold runs; for an Optuna study, its history and
parameter importances as PNG. Optuna and matplotlib are imported only where a study is read."""

from __future__ import annotations

import csv
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from thaw.checkpoint import read_record
from thaw.errors import UserError
from thaw.search import STUDY_FILE
from thaw.search.sweep_table import (
    COLUMNS,
    Row,
    common_overrides,
    for_display,
    markdown_table,
    sweep_markdown,
)

log = logging.getLogger(__name__)

SHOWN_ROWS = 5  # printed to the console
# Keys a sweep sets for its own bookkeeping, not choices of the run.
_BOOKKEEPING = ("callbacks.optuna_pruning", "hydra.")


class SweepReport(Callback):
    """Hydra callback (conf/hydra/default.yaml): the report at the end of every multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep_report(Path(str(config.hydra.sweep.dir)))


def write_sweep_report(sweep_dir: Path) -> list[Row]:
    """Write sweep.csv and sweep.md (and the study's plots) into `sweep_dir`, print the best
    rows, and return every row, best first."""
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a sweep dir (python train.py -m ... makes one)")
    metric, direction = _objective(sweep_dir)
    study_file = sweep_dir / STUDY_FILE
    plots: list[str] = []
    if study_file.is_file():
        studies = _studies(study_file)
        rows = study_rows(studies, metric)
        plots = _study_plots(studies[0], sweep_dir) if studies else []
        common: list[str] = []  # a trial's overrides are its sampled values only
    else:
        rows = job_rows(sweep_dir, metric)
        common = common_overrides(rows)
    rows = ranked(rows, direction)
    folds = fold_summary(rows)
    with (sweep_dir / "sweep.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(row.cells() for row in rows)
    (sweep_dir / "sweep.md").write_text(
        sweep_markdown(sweep_dir, metric, direction, rows, common, folds, plots)
    )
    shown = markdown_table(for_display(rows[:SHOWN_ROWS], common), with_paths=False)
    log.info(
        "Sweep %s: %d jobs, %s (%s), best first:\n%s\nThe report: %s",
        sweep_dir,
        len(rows),
        metric,
        direction,
        shown,
        sweep_dir / "sweep.md",
    )
    return rows


def job_rows(sweep_dir: Path, metric: str) -> list[Row]:
    """One row per job dir of a grid sweep (each has .hydra/overrides.yaml): COMPLETE when it
    wrote metrics.json, else FAIL."""
    rows = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        overrides = _choices(OmegaConf.to_container(OmegaConf.load(overrides_file)))
        metrics = _numbers(read_record(run_dir / "metrics.json"))
        row = Row(
            str(run_dir.relative_to(sweep_dir)),
            "COMPLETE" if metrics else "FAIL",
            overrides,
            str(run_dir),
            metrics=metrics,
        )
        _fill_from_metrics(row, metric)
        rows.append(row)
    return rows


def _studies(study_file: Path) -> list[Any]:
    """Every Optuna study in the SQLite file, read once for the rows and the plots."""
    import optuna

    storage = f"sqlite:///{study_file.resolve()}"
    return [
        optuna.load_study(study_name=summary.study_name, storage=storage)
        for summary in optuna.get_all_study_summaries(storage)
    ]


def study_rows(studies: Sequence[Any], metric: str) -> list[Row]:
    """One row per trial of every study, earlier runs' trials included; the run's metrics.json
    fills in what it wrote (test/acc, wall time)."""
    rows: list[Row] = []
    for study in studies:
        prefix = f"{study.study_name}/" if len(rows) else ""
        for trial in study.get_trials(deepcopy=False):
            run_dir = str(trial.user_attrs.get("run_dir", ""))
            metrics = _numbers(read_record(Path(run_dir) / "metrics.json")) if run_dir else {}
            reported = list(trial.intermediate_values.values())
            if reported and "val/acc_best" not in metrics:
                metrics["val/acc_best"] = max(reported)
            row = Row(
                f"{prefix}trial {trial.number}",
                trial.state.name,
                _choices(f"{k}={v}" for k, v in trial.params.items()),
                run_dir,
                value=trial.value if trial.state.name == "COMPLETE" else None,
                epochs=len(reported) or None,
                error=str(trial.user_attrs.get("error", "")),
                metrics=metrics,
            )
            _fill_from_metrics(row, metric)
            if row.wall_time_s is None and trial.duration is not None:
                row.wall_time_s = trial.duration / timedelta(seconds=1)
            rows.append(row)
    return rows


def ranked(rows: Iterable[Row], direction: str) -> list[Row]:
    """Rows with a value first, best first (`direction` maximize or minimize); then the rest."""
    sign = -1.0 if direction == "maximize" else 1.0

    def key(row: Row) -> tuple[bool, float]:
        missing = row.value is None or math.isnan(row.value)
        return missing, 0.0 if missing else sign * row.value

    return sorted(rows, key=key)


def fold_summary(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """K-fold: for each setting run on two or more folds (`data.fold=k`, the rest the same),
    the mean and standard deviation of every metric of its completed folds."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.state == "COMPLETE" and any(o.startswith("data.fold=") for o in row.overrides):
            rest = " ".join(o for o in row.overrides if not o.startswith("data.fold="))
            groups.setdefault(rest, []).append(row)
    summary = []
    for setting, members in groups.items():
        if len(members) < 2:
            continue
        names = sorted(set.intersection(*(set(m.metrics) for m in members)))
        stats = {}
        for name in names:
            values = [m.metrics[name] for m in members]
            stats[name] = (statistics.fmean(values), statistics.stdev(values))
        summary.append(
            {"setting": setting or "(no other overrides)", "folds": len(members), "stats": stats}
        )
    return summary


def _objective(sweep_dir: Path) -> tuple[str, str]:
    """(optimized_metric, direction) from the multirun.yaml Hydra saved in the sweep dir."""
    config_file = sweep_dir / "multirun.yaml"
    config = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create()
    metric = OmegaConf.select(config, "optimized_metric", default=None) or "val/acc_best"
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if direction not in ("maximize", "minimize"):
        direction = "minimize" if "loss" in metric else "maximize"
    return metric, direction


def _choices(overrides: Iterable[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+~").startswith(_BOOKKEEPING)]


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _fill_from_metrics(row: Row, metric: str) -> None:
    if row.value is None and row.state == "COMPLETE":
        row.value = row.metrics.get(metric)
    if "train/epochs" in row.metrics:
        row.epochs = int(row.metrics["train/epochs"])
    row.wall_time_s = row.metrics.get("train/wall_time_s", row.wall_time_s)


def _study_plots(study: Any, sweep_dir: Path) -> list[str]:
    """optimization_history.png, and param_importances.png once two or more trials completed
    (fANOVA needs them); the names of the files written."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as plots

    from thaw.analysis.figures import png

    written = []
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    figures = {"optimization_history.png": plots.plot_optimization_history}
    if len(complete) >= 2 and len({k for t in complete for k in t.params}) >= 1:
        figures["param_importances.png"] = plots.plot_param_importances
    for name, plot in figures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = plot(study)
        axes.figure.set_size_inches(9, 4.5)  # room for long parameter names
        axes.figure.tight_layout()
        (sweep_dir / name).write_bytes(png(axes.figure))
        written.append(name)
    return written
