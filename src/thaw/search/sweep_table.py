"""The sweep's rows and their markdown: one row per job or trial, as sweep.csv's columns, and the
table of sweep.md (and the console) that shows what differs between jobs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def common_overrides(rows: Sequence[Row]) -> list[str]:
    """The overrides every row has (when there are two rows or more), in the first's order."""
    if len(rows) < 2:
        return []
    shared = set.intersection(*(set(r.overrides) for r in rows))
    return [o for o in rows[0].overrides if o in shared]


def for_display(rows: Sequence[Row], common: Sequence[str]) -> list[Row]:
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


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Row], with_paths: bool = True) -> str:
    columns = COLUMNS if with_paths else [c for c in COLUMNS if c not in ("run_dir", "error")]
    lines = ["| rank | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for rank, row in enumerate(rows, start=1):
        cells = row.cells()
        lines.append(f"| {rank} | " + " | ".join(_format(cells[c]) for c in columns) + " |")
    return "\n".join(lines)


def sweep_markdown(
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
    parts.append(markdown_table(for_display(rows, common)))
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
