"""`python predict.py ckpt_path=... inputs=...`: classify image files, write predictions.csv."""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from thaw.checkpoint import CheckpointError
from thaw.config import config_dir
from thaw.inference.inputs import resolve_inputs
from thaw.inference.predictor import (
    Predictor,
    best_device,
    checkpoint_paths,
    predict_files,
    prediction_row,
)

log = logging.getLogger(__name__)

OUT_SUFFIXES = (".csv", ".json")
# What a user can fix: said in one paragraph, exit status 2 (a bug keeps its traceback).
USER_ERRORS = (CheckpointError, FileNotFoundError, ImportError, ValueError)


def predict(cfg: DictConfig) -> Path:
    """Predict every image `inputs` names and write the rows to `out`; returns its path."""
    return run(cfg, *setup(cfg))


def setup(cfg: DictConfig) -> tuple[Predictor, list[Path], Path]:
    """The Predictor, the image files and the output path: everything a user can get wrong is
    checked here, before anything is written. `out` is in the run dir unless absolute."""
    for key in ("top_k", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    out = Path(cfg.paths.output_dir) / cfg.out  # an absolute `out` replaces the run dir
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"out={cfg.out!r} must end in .csv or .json (the format to write)")
    paths = resolve_inputs(cfg.inputs)
    ckpts, model_path = checkpoint_paths(cfg.ckpt_path), cfg.get("model_path")
    if bool(ckpts) == bool(model_path):
        raise ValueError(
            "give either ckpt_path=<file.ckpt> (or a list [a.ckpt,b.ckpt], an ensemble) or "
            f"model_path=<model.onnx>, not {'both' if ckpts else 'neither'}"
        )
    if model_path:
        predictor = Predictor.from_onnx(model_path, cfg.tta)
    else:
        predictor = Predictor.from_checkpoints(ckpts, cfg.tta, best_device(cfg.device))
    return predictor, paths, out


def run(cfg: DictConfig, predictor: Predictor, paths: list[Path], out: Path) -> Path:
    """Predict `paths` in batches (a progress bar on a terminal) and write the rows to `out`."""
    log.info("Predicting %d images on %s (tta=%s)", len(paths), predictor.device, cfg.tta)
    results = predict_files(predictor, paths, cfg.batch_size)
    terminal = Console(stderr=True).is_terminal
    shown = track(results, "Predicting", total=len(paths), disable=not terminal)
    rows = [prediction_row(result, predictor, cfg.top_k) for result in shown]
    write_rows(out, rows)
    errors = sum(row["error"] is not None for row in rows)
    if errors:
        log.warning("%d of %d files could not be decoded: see the error column", errors, len(rows))
    log.info("Wrote %d predictions to %s", len(rows), out)
    return out


def write_rows(out: Path, rows: Iterable[dict[str, Any]]) -> None:
    """CSV (None as an empty cell) or JSON (a list of row objects), by `out`'s suffix."""
    rows = list(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=2) + "\n")
        return
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _main(cfg: DictConfig) -> None:
    try:
        job = setup(cfg)
    except USER_ERRORS as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    run(cfg, *job)


def main() -> None:
    """Console entry point (`thaw-predict`, `python predict.py`)."""
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")(_main)()
