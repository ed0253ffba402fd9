"""`python predict.py ckpt_path=... inputs=...`: classify image files, write predictions.csv;
with `explain=true`, also a Grad-CAM overlay of each image's predicted class."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from thaw import checks
from thaw.analysis.gradcam import explain
from thaw.data.images import load_image
from thaw.errors import UserError
from thaw.inference.inputs import resolve_inputs
from thaw.inference.predictor import (
    LABEL_SEPARATOR,
    Predictor,
    best_device,
    check_rejection,
    checkpoint_paths,
    predict_files,
    prediction_row,
)
from thaw.models import ImageClassifier
from thaw.progress import track
from thaw.renderings import metric_tag

log = logging.getLogger(__name__)

OUT_SUFFIXES = (".csv", ".json")
EXPLAIN_DIR = "explain"  # beside the output file: <index>_<file stem>.png per image


def predict(cfg: DictConfig) -> Path:
    """Predict every image `inputs` names and write the rows to `out`; returns its path."""
    return run(cfg, *setup(cfg))


def setup(cfg: DictConfig) -> tuple[Predictor, list[Path], Path]:
    """The Predictor, the image files and the output path: everything a user can get wrong is
    checked here, before anything is written. `out` is in the run dir unless absolute."""
    for key in ("top_k", "batch_size"):
        checks.integer(key, cfg[key], 1)
    out = Path(cfg.paths.output_dir) / cfg.out  # an absolute `out` replaces the run dir
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"out={cfg.out!r} must end in .csv or .json (the format to write)")
    checks.writable("out", out)  # explain/ goes beside it, in the same folder
    paths = resolve_inputs(cfg.inputs)
    ckpts, model_path = checkpoint_paths(cfg.ckpt_path), cfg.get("model_path")
    if bool(ckpts) == bool(model_path):
        raise UserError(
            "give either ckpt_path=<file.ckpt> (or a list [a.ckpt,b.ckpt], an ensemble) or "
            f"model_path=<model.onnx>, not {'both' if ckpts else 'neither'}"
        )
    explaining = cfg.get("explain", False)
    checks.flag("explain", explaining)
    if explaining and model_path:
        raise UserError(
            "explain=true needs the PyTorch model, as Grad-CAM takes gradients through it: give "
            f"ckpt_path=<file.ckpt> (the checkpoint {model_path} was exported from) in place of "
            "model_path"
        )
    if explaining and len(ckpts) > 1:
        raise UserError(
            f"explain=true needs one checkpoint, not an ensemble of {len(ckpts)}: give "
            "ckpt_path=<file.ckpt>"
        )
    checks.flag("reject", cfg.reject)
    if model_path:
        predictor = Predictor.from_onnx(model_path, cfg.tta)
    else:
        predictor = Predictor.from_checkpoints(ckpts, cfg.tta, best_device(cfg.device))
    check_rejection(predictor, cfg.reject, model_path or ckpts[0])
    return predictor, paths, out


def run(cfg: DictConfig, predictor: Predictor, paths: list[Path], out: Path) -> Path:
    """Predict `paths` in batches (a progress bar on a terminal) and write the rows to `out`."""
    log.info("Predicting %d images on %s (tta=%s)", len(paths), predictor.device, cfg.tta)
    results = predict_files(predictor, paths, cfg.batch_size)
    shown = track(results, "Predicting", total=len(paths))
    rows = [prediction_row(result, predictor, cfg.top_k, cfg.reject) for result in shown]
    if cfg.get("explain", False):
        explain_rows(rows, predictor, out.parent / EXPLAIN_DIR, cfg.batch_size)
    write_rows(out, rows)
    errors = sum(row["error"] is not None for row in rows)
    if errors:
        log.warning("%d of %d files could not be decoded: see the error column", errors, len(rows))
    log.info("Wrote %d predictions to %s", len(rows), out)
    return out


def explain_rows(
    rows: list[dict[str, Any]], predictor: Predictor, folder: Path, batch_size: int
) -> None:
    """Write the Grad-CAM overlay of each row's predicted class (`top1_label`, TTA included) on
    the model's input view of its file to folder/<index>_<stem>.png (the index keeps two
    photos/a/1.jpg and photos/b/1.jpg apart), and add the path to the row as `explanation`:
    None where the file could not be decoded. The overlay has the model's input size. A
    multi-label row gets one overlay per predicted label, <index>_<stem>_<label>.png, their
    paths `|`-separated in `explanation`."""
    member = predictor.members[0]
    if not isinstance(member.model, ImageClassifier):  # setup refuses ONNX models and ensembles
        raise TypeError(f"explain needs one PyTorch classifier, got {type(member.model)}")
    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(len(rows) - 1))
    starts = range(0, len(rows), batch_size)
    written = 0
    for start in track(starts, "Explaining", total=len(starts)):
        chunk, images = [], []
        for index, row in enumerate(rows[start : start + batch_size], start):
            row["explanation"] = None
            if row["error"] is not None:
                continue
            try:
                images.append(load_image(Path(row["path"]), predictor.decode_size))
            except OSError as err:  # changed since it was predicted: the row keeps its label
                log.warning("could not explain %s: %s", row["path"], err)
                continue
            chunk.append((index, row, explained_labels(row)))
        wanted = [
            (image, label)
            for image, (*_, labels) in zip(images, chunk, strict=True)
            for label in labels
        ]
        targets = [predictor.classes.index(label) for _, label in wanted]
        pictures = iter(
            explain(member.model, member.preprocessing, [i for i, _ in wanted], targets)
        )
        for index, row, labels in chunk:
            paths = []
            for label in labels:
                suffix = f"_{metric_tag(label)}" if "labels" in row else ""
                path = folder / f"{index:0{width}d}_{Path(row['path']).stem}{suffix}.png"
                next(pictures)[1].save(path)
                paths.append(str(path))
            row["explanation"] = LABEL_SEPARATOR.join(paths)
            written += len(paths)
    log.info("Wrote %d Grad-CAM overlays to %s", written, folder)


def explained_labels(row: dict[str, Any]) -> list[str]:
    """The labels a row's overlays explain: its predicted class, or a multi-label row's
    predicted labels (its most likely one where the set is empty)."""
    if "labels" not in row:
        return [row["top1_label"]]
    if row["labels"]:
        return row["labels"].split(LABEL_SEPARATOR)
    probabilities = {k[len("prob_") :]: v for k, v in row.items() if k.startswith("prob_")}
    return [max(probabilities, key=probabilities.__getitem__)]


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


def task(cfg: DictConfig) -> None:
    """The command line's job (thaw.cli.predict)."""
    run(cfg, *setup(cfg))
