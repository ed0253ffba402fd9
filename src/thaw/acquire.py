"""`python acquire.py ckpt_path=... pool=... budget=100`: rank a pool of unlabelled images by what
labelling them would teach the model (an acquisition strategy, thaw.review.acquisition), and
write the `budget` most useful into the run dir as a queue to label: acquire.csv, a gallery page
and a Label Studio import. Inference only: no training code is imported."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from itertools import takewhile
from pathlib import Path

import torch
from omegaconf import DictConfig

from thaw import checks
from thaw.data.images import load_image, map_files
from thaw.errors import UserError
from thaw.inference.inputs import LIST_SUFFIX, resolve_inputs
from thaw.inference.predictor import best_device, channels_last_on
from thaw.models import ImageClassifier, load_trained
from thaw.progress import track
from thaw.review.acquisition import STRATEGIES, pool_outputs
from thaw.review.queue import Queued, write_gallery, write_label_studio

log = logging.getLogger(__name__)

CSV_NAME = "acquire.csv"
COLUMNS = ("path", "rank", "score", "label", "prob")
SHOWN_ROWS = 10
_GLOB_CHARS = frozenset("*?[")


def acquire(cfg: DictConfig) -> Path:
    """Queue the `budget` most useful images of `pool` by `strategy`; returns acquire.csv's
    path. Every setting is checked before the model is loaded."""
    checks.integer("budget", cfg.budget, 1)
    checks.choice("strategy", cfg.strategy, list(STRATEGIES))
    checks.integer("seed", cfg.seed)
    checks.integer("batch_size", cfg.batch_size, 1)
    output_dir = Path(cfg.paths.output_dir)
    checks.writable("paths.output_dir", output_dir, folder=True)
    paths = resolve_inputs(cfg.pool, key="pool")
    device = best_device(cfg.device)
    model = load_trained(cfg.ckpt_path, channels_last=channels_last_on(device)).to(device)
    if model.postprocessing.multilabel:
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} is a multi-label model: acquire.py ranks a single-label "
            "model's uncertainty over its classes, which label sets do not have"
        )
    files, probabilities, features = file_outputs(model, paths, cfg.batch_size, device)
    budget = min(cfg.budget, len(files))
    if budget < cfg.budget:
        log.info("budget=%d is more than the %d pool images read: queueing all", cfg.budget, budget)
    order, scores = STRATEGIES[cfg.strategy](probabilities, features, budget, cfg.seed)
    queue = queued(files, probabilities, order, scores, model.classes)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = output_dir / CSV_NAME
    write_queue(csv_path, queue)
    note = (
        f"The {len(queue):,} of {len(files):,} pool images that {cfg.strategy} finds most useful "
        "to label, most useful first: the model's guess, its probability and the score."
    )
    write_gallery(output_dir / "acquire.html", "Label next", note, queue, cfg.strategy)
    write_label_studio(output_dir, queue, model.classes, pool_root(cfg.pool))
    show(queue, len(files), cfg.strategy)
    log.info("Queue written to %s (acquire.html, label_studio.json)", output_dir)
    return csv_path


def file_outputs(
    model: ImageClassifier, paths: Sequence[Path], batch_size: int, device: str
) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """The files that decode, with their probabilities (N, C) and features (N, D): decoded and
    transformed as predict.py does, `batch_size` at a time. A pool is messy, so a file that
    does not decode is skipped with a warning; none decoding is an error."""
    transform = model.preprocessing.transform()

    def prepare(path: Path) -> torch.Tensor | str:
        try:
            return transform(load_image(path, model.preprocessing.resize_size))
        except OSError as err:
            return str(err)

    prepared = map_files(prepare, paths)
    files: list[Path] = []
    probabilities, features = [], []
    starts = range(0, len(paths), batch_size)
    for start in track(starts, "Scoring the pool", total=len(starts)):
        batch = []
        for path in paths[start : start + batch_size]:
            inputs = next(prepared)
            if isinstance(inputs, str):
                log.warning("Skipped %s: %s", path, inputs)
                continue
            files.append(path)
            batch.append(inputs)
        if batch:
            batch_probabilities, batch_features = pool_outputs(model, torch.stack(batch).to(device))
            probabilities.append(batch_probabilities)
            features.append(batch_features)
    if not files:
        raise UserError(
            f"none of the {len(paths)} pool images could be decoded (see the warnings): give "
            "a pool of image files"
        )
    if len(files) < len(paths):
        log.warning("%d of %d pool files could not be decoded", len(paths) - len(files), len(paths))
    return files, torch.cat(probabilities), torch.cat(features)


def queued(
    files: Sequence[Path],
    probabilities: torch.Tensor,
    order: torch.Tensor,
    scores: torch.Tensor,
    classes: Sequence[str],
) -> list[Queued]:
    """The chosen files in `order`, each with the model's guess and its probability."""
    top = probabilities[order].max(dim=1)
    return [
        Queued(key=files[i], picture=files[i], label=classes[label], prob=prob, score=score)
        for i, label, prob, score in zip(
            order.tolist(), top.indices.tolist(), top.values.tolist(), scores.tolist(), strict=True
        )
    ]


def write_queue(path: Path, queue: Sequence[Queued]) -> None:
    """acquire.csv: one row per queued file, most useful first."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for rank, item in enumerate(queue, start=1):
            writer.writerow([str(item.key), rank, item.score, item.label, item.prob])


def pool_root(value: str) -> Path:
    """The folder Label Studio serves the pool's files from: the pool folder, the folder of a
    list or an image file, or a glob's folder part."""
    path = Path(str(value)).expanduser()
    if path.is_dir():
        return path
    if path.is_file() or path.suffix.lower() == LIST_SUFFIX:
        return path.parent
    fixed = list(takewhile(lambda part: not _GLOB_CHARS & set(part), path.parts))
    return Path(*fixed) if fixed else Path()


def show(queue: Sequence[Queued], pool: int, strategy: str) -> None:
    """The count and the top rows, on the console."""
    shown = min(SHOWN_ROWS, len(queue))
    lines = [f"Queued {len(queue):,} of {pool:,} pool images by {strategy}; top {shown}:"]
    lines.append(f"{'rank':>4}  {'score':>8}  {'label':<14} {'prob':>6}  path")
    for rank, item in enumerate(queue[:shown], start=1):
        lines.append(f"{rank:>4}  {item.score:8.4f}  {item.label:<14} {item.prob:6.3f}  {item.key}")
    print("\n".join(lines))


def task(cfg: DictConfig) -> None:
    """The command line's job (thaw.cli.acquire)."""
    acquire(cfg)
