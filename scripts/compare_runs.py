"""Print a table of the test metrics of finished runs: python scripts/compare_runs.py RUN_DIR..."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from thaw.renderings import text_table

# test/acc_top5 is there only for runs of more than 5 classes: a column when any run has it.
COLUMNS = ("test/acc", "test/acc_top5", "test/f1_macro")


def describe(run: Path) -> tuple[str, str]:
    """The run's backbone weights and fine-tuning strategy, as its saved config says."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    strategy = str(cfg.finetune._target_).rsplit(".", 1)[-1]
    return str(OmegaConf.select(cfg, "model.weights")), strategy


def table(run_dirs: list[Path]) -> str:
    metrics = [json.loads((run / "metrics.json").read_text()) for run in run_dirs]
    columns = [c for c in COLUMNS if any(c in m for m in metrics)]
    rows = [("run", "weights", "finetune", *columns)]
    for run, values in zip(run_dirs, metrics, strict=True):
        cells = (f"{values[c]:.4f}" if c in values else "-" for c in columns)
        rows.append((run.name, *describe(run), *cells))
    return text_table(rows)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table([Path(p) for p in sys.argv[1:]]))
