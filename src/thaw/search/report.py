"""The sweep report: after every multirun (grid or Optuna), and on demand with
`python scripts/sweep_report.py <sweep dir>`, one row per job or trial in sweep.csv and
sweep.md, best first; mean ± std across K-fold runs; for an Optuna study, its history and
parameter importances as PNG. Optuna and matplotlib are imported only where a study is read."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from thaw.checkpoint import read_record
from thaw.search import STUDY_FILE

log = logging.getLogger(__name__)

COLUMNS = [
    "job",
    "state",
    "value",
    "val/acc_best",
    "test/acc",
    "epochs",
    "wall_time_s",
    "overrides",
    "run_dir",
    "error",
]
SHOWN_ROWS = 5  # printed to the console
# Keys a sweep sets for its own bookkeeping, not choices of the run.
_BOOKKEEPING = ("callbacks.optuna_pruning", "hydra.")


@dataclass
class Row:
    """One job of the sweep, or one trial of its study."""

    job: str
    state: str
    overrides: list[str]
    run_dir: str = ""
    value: float | None = None
    epochs: int | None = None
    wall_time_s: float | None = None
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def cells(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "state": self.state,
            "value": self.value,
            "val/acc_best": self.metrics.get("val/acc_best"),
            "test/acc": self.metrics.get("test/acc"),
            "epochs": self.epochs,
            "wall_time_s": self.wall_time_s,
            "overrides": " ".join(self.overrides),
            "run_dir": self.run_dir,
            "error": self.error,
        }


class SweepReport(Callback):
    """Hydra callback (conf/hydra/default.yaml): the report at the end of every multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep_report(Path(str(config.hydra.sweep.dir)))


def write_sweep_report(sweep_dir: Path) -> list[Row]:
    """Write sweep.csv and sweep.md (and the study's plots) into `sweep_dir`, print the best
    rows, and return every row, best first."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"{sweep_dir} is not a sweep dir (python train.py -m ... makes one)"
        )
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
        common = _common(rows)
    rows = ranked(rows, direction)
    folds = fold_summary(rows)
    with (sweep_dir / "sweep.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(row.cells() for row in rows)
    (sweep_dir / "sweep.md").write_text(
        _markdown(sweep_dir, metric, direction, rows, common, folds, plots)
    )
    shown = _table(_without(rows[:SHOWN_ROWS], common), with_paths=False)
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


def _common(rows: Sequence[Row]) -> list[str]:
    """The overrides every row has (when there are two rows or more), in the first's order."""
    if len(rows) < 2:
        return []
    shared = set.intersection(*(set(r.overrides) for r in rows))
    return [o for o in rows[0].overrides if o in shared]


def _without(rows: Sequence[Row], common: Sequence[str]) -> list[Row]:
    """The rows for display: without the overrides every job has, and numbers to 4 digits."""
    return [
        dataclasses.replace(r, overrides=[_short(o) for o in r.overrides if o not in common])
        for r in rows
    ]


def _short(override: str) -> str:
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if "." in value or "e" in value else override


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


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(rows: Sequence[Row], with_paths: bool = True) -> str:
    columns = COLUMNS if with_paths else [c for c in COLUMNS if c not in ("run_dir", "error")]
    lines = ["| rank | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for rank, row in enumerate(rows, start=1):
        cells = row.cells()
        lines.append(f"| {rank} | " + " | ".join(_format(cells[c]) for c in columns) + " |")
    return "\n".join(lines)


def _markdown(
    sweep_dir: Path,
    metric: str,
    direction: str,
    rows: Sequence[Row],
    common: Sequence[str],
    folds: Sequence[dict[str, Any]],
    plots: Sequence[str],
) -> str:
    states = {
        state: sum(r.state == state for r in rows) for state in dict.fromkeys(r.state for r in rows)
    }
    counts = ", ".join(f"{n} {state}" for state, n in states.items())
    parts = [
        f"# Sweep {sweep_dir}",
        "",
        f"{len(rows)} jobs ({counts}); value = {metric}, {direction}d, best first.",
        "",
    ]
    if common:
        parts += [f"Every job: `{' '.join(common)}`; the table shows what differs.", ""]
    parts.append(_table(_without(rows, common)))
    if folds:
        parts += ["", "## Cross-validation (mean ± std over folds)", ""]
        for group in folds:
            parts.append(f"**{group['setting']}** ({group['folds']} folds)")
            parts.append("")
            parts.append("| metric | mean | std |\n|---|---|---|")
            parts += [
                f"| {name} | {mean:.4f} | {std:.4f} |"
                for name, (mean, std) in group["stats"].items()
            ]
            parts.append("")
    for name in plots:
        parts += ["", f"![{name}]({name})"]
    return "\n".join(parts) + "\n"
