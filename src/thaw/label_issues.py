"""`python label_issues.py <the training overrides> folds=5`: train K folds with the run's own
config, rank the training pool's suspect labels with cleanlab from the out-of-fold
probabilities, and write the review queue into the run dir."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from thaw import checks
from thaw.review.label_issues import (
    FILTERS,
    RANKINGS,
    label_issues,
    require_cleanlab,
    write_issues,
    write_scores,
)
from thaw.review.out_of_fold import out_of_fold
from thaw.review.queue import write_gallery, write_label_studio

log = logging.getLogger(__name__)

SHOWN_ROWS = 10


def find_issues(cfg: DictConfig) -> Path:
    """The review queue of `cfg`'s training pool; returns label_issues.csv's path."""
    checks.integer("folds", cfg.folds, 2)
    checks.choice("filter_by", cfg.filter_by, FILTERS)
    checks.choice("rank_by", cfg.rank_by, RANKINGS)
    require_cleanlab()
    output_dir = Path(cfg.paths.output_dir)
    oof = out_of_fold(cfg, cfg.folds, output_dir)
    issues = label_issues(oof, cfg.filter_by, cfg.rank_by)
    column = "index" if oof.keys and isinstance(oof.keys[0], int) else "path"
    write_scores(output_dir, oof, column)
    csv_path = output_dir / "label_issues.csv"
    write_issues(csv_path, issues, column)
    note = (
        f"Labels that cleanlab ({cfg.filter_by}, ranked by {cfg.rank_by}) finds suspect in "
        f"{len(oof.keys):,} training images, from {cfg.folds}-fold out-of-fold probabilities; "
        "worst first: given label, then the suggestion with its probability."
    )
    write_gallery(output_dir / "label_issues.html", "Label issues", note, issues, "quality")
    root = Path(cfg.data.root) if cfg.data.get("root") else None
    write_label_studio(output_dir, issues, oof.classes, root)
    show(issues, len(oof.keys), column)
    log.info("Review queue written to %s (label_issues.html, label_studio.json)", output_dir)
    return csv_path


def show(issues: list, pool: int, column: str) -> None:
    """The count and the worst rows, on the console."""
    share = len(issues) / pool if pool else 0.0
    lines = [f"Found {len(issues):,} label issues in {pool:,} images ({share:.1%}); worst first:"]
    lines.append(f"{'rank':>4}  {'quality':>8}  {'given':>14} -> {'suggested':<14} {column}")
    for rank, item in enumerate(issues[:SHOWN_ROWS], start=1):
        lines.append(
            f"{rank:>4}  {item.score:8.4f}  {item.given:>14} -> {item.label:<14} {item.key}"
        )
    print("\n".join(lines))


def task(cfg: DictConfig) -> None:
    """The command line's job (thaw.cli.label_issues)."""
    find_issues(cfg)
