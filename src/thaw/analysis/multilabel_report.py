"""The evaluation report of a multi-label model, in report.json and report.html: per label its
AP, stored threshold, precision and recall there, its precision-recall curve, the labels it
misses most with the images it missed them on, and Grad-CAM of each predicted label.

A multi-label model has no confusion matrix and no top-1 class, so it gets this report rather
than thaw.analysis.evaluation_report's; the two share the summary, the model size, the page's
look and the input views.
"""

from __future__ import annotations

import heapq
import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_precision_recall_curve,
)

from thaw.analysis.evaluation_report import input_view, layer_name, model_size, summary
from thaw.analysis.figures import PR_CURVES, precision_recall_figure
from thaw.analysis.gradcam import grad_cam, overlay
from thaw.analysis.html import png_bytes, render_page
from thaw.models.network import ImageClassifier

log = logging.getLogger(__name__)

MISSED_LABELS = 5  # the labels of lowest recall shown with their misses
MISSES_SHOWN = 4  # per label: the missed images of lowest probability
GRADCAM_IMAGES = 8  # the first test images, each label the model gives them explained
GRADCAM_LABELS = 3  # at most this many labels of one image


def write_multilabel_report(
    model: ImageClassifier,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    output_dir: Path,
    run_config: dict[str, Any],
    checkpoint: str | None = None,
    wall_time_s: float | None = None,
    tensorboard: Sequence[Any] = (),
) -> dict[str, Any]:
    """Analyse the multi-label `model` on the test `batches` at its stored thresholds; write
    report.json and report.html into `output_dir` (the PR curves also to each TensorBoard
    writer). Returns report.json's content."""
    model.eval()
    postprocessing = model.postprocessing
    if postprocessing.thresholds is None:
        raise ValueError("a multi-label report needs a model with label thresholds")
    data = _collect(model, batches)
    probabilities, labels = data["probabilities"], data["labels"]
    classes, count = model.classes, len(model.classes)
    sets = postprocessing.label_sets(probabilities).long()
    rows = _per_label(probabilities, labels, sets, classes, postprocessing.thresholds)
    images: dict[str, bytes] = {}
    curves = _curves(probabilities, labels, rows)
    images["pr_curves"] = precision_recall_figure(curves)
    missed = sorted(rows, key=lambda row: (row["recall"], row["label"]))[:MISSED_LABELS]
    most_missed = []
    for row in missed:
        examples = sorted(data["missed"][row["index"]], key=lambda item: -item[0])
        shown = []
        for rank, (negative_prob, index, image) in enumerate(examples):
            images[f"missed_{row['index']}_{rank}"] = png_bytes(
                input_view(image, model.preprocessing)
            )
            shown.append({"index": index, "prob": -negative_prob})
        most_missed.append(
            {"index": row["index"], "label": row["label"], "recall": row["recall"]}
            | {"examples": shown}
        )
    explained = _explained(model, data["first"], sets, images)
    report = {
        "summary": summary(run_config, classes, checkpoint, wall_time_s),
        "metrics": {
            "map": float(multilabel_average_precision(probabilities, labels, count)),
            "f1_micro": float(multilabel_f1_score(sets, labels, count, average="micro")),
            "f1_macro": float(multilabel_f1_score(sets, labels, count, average="macro")),
            "exact_match": float(multilabel_exact_match(sets, labels, count)),
        },
        "test_images": len(labels),
        "per_label": sorted(rows, key=lambda row: (row["ap"], row["label"])),
        "most_missed": most_missed,
        "gradcam": {"layer": layer_name(model), "images": explained},
        "model_size": model_size(model, model.preprocessing.input_size),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.html").write_text(
        render_page("multilabel_report.html.j2", report=report, images=images)
    )
    for writer in tensorboard:
        writer.add_image("test/pr_curves", _decoded(images["pr_curves"]), dataformats="HWC")
        writer.flush()
    log.info("Report written to %s", output_dir / "report.html")
    return report


@torch.inference_mode()
def _collect(
    model: ImageClassifier, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Any]:
    """One pass: every probability and label, the first GRADCAM_IMAGES inputs, and per label
    the MISSES_SHOWN missed images (true label below its threshold) of lowest probability."""
    device = next(model.parameters()).device
    postprocessing = model.postprocessing
    outputs, targets, first = [], [], []
    missed: dict[int, list[tuple[float, int, torch.Tensor]]] = {}
    seen = 0
    for images, labels in batches:
        probabilities = postprocessing.probabilities(model(images.to(device)).float()).cpu()
        labels = labels.cpu().long()
        outputs.append(probabilities)
        targets.append(labels)
        first += [(seen + i, image.cpu()) for i, image in enumerate(images)][
            : GRADCAM_IMAGES - len(first)
        ]
        misses = (labels == 1) & ~postprocessing.label_sets(probabilities)
        for row, label in torch.nonzero(misses).tolist():
            pool = missed.setdefault(label, [])
            # A heap on -probability: its top is the highest of those kept, the one to drop.
            item = (-float(probabilities[row, label]), seen + row, images[row].cpu())
            if len(pool) < MISSES_SHOWN:
                heapq.heappush(pool, item)
            elif item[0] > pool[0][0]:
                heapq.heapreplace(pool, item)
        seen += len(labels)
    return {
        "probabilities": torch.cat(outputs),
        "labels": torch.cat(targets),
        "first": first,
        "missed": missed,
    }


def _per_label(
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    sets: torch.Tensor,
    classes: list[str],
    thresholds: Sequence[float],
) -> list[dict[str, Any]]:
    """Each label's support, threshold, AP, and precision, recall and F1 at the threshold."""
    ap = multilabel_average_precision(probabilities, labels, len(classes), average=None)
    true_positives = (sets & labels).sum(0).double()
    predicted, actual = sets.sum(0).double(), labels.sum(0).double()
    precision = (true_positives / predicted.clamp(min=1)).tolist()
    recall = (true_positives / actual.clamp(min=1)).tolist()
    f1 = (2 * true_positives / (predicted + actual).clamp(min=1)).tolist()
    return [
        {
            "index": i,
            "label": name,
            "support": int(actual[i]),
            "threshold": float(thresholds[i]),
            "ap": float(ap[i]),
            "precision": precision[i],
            "recall": recall[i],
            "f1": f1[i],
        }
        for i, name in enumerate(classes)
    ]


def _curves(
    probabilities: torch.Tensor, labels: torch.Tensor, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The precision-recall curves of the PR_CURVES labels of lowest AP, in label order."""
    precision, recall, _ = multilabel_precision_recall_curve(probabilities, labels, len(rows))
    weakest = sorted(rows, key=lambda row: (row["ap"], row["label"]))[:PR_CURVES]
    return [
        {
            "label": row["label"],
            "ap": row["ap"],
            "precision": precision[row["index"]].tolist(),
            "recall": recall[row["index"]].tolist(),
            "at": (row["precision"], row["recall"]),
        }
        for row in sorted(weakest, key=lambda row: row["index"])
    ]


def _explained(
    model: ImageClassifier,
    first: list[tuple[int, torch.Tensor]],
    sets: torch.Tensor,
    images: dict[str, bytes],
) -> list[dict[str, Any]]:
    """Grad-CAM of each label given to the first test images (up to GRADCAM_LABELS each)."""
    wanted = [
        (index, image, label)
        for index, image in first
        for label in torch.nonzero(sets[index]).flatten().tolist()[:GRADCAM_LABELS]
    ]
    if not wanted:
        return []
    device = next(model.parameters()).device
    batch = torch.stack([image for _, image, _ in wanted]).to(device)
    targets = torch.tensor([label for *_, label in wanted], device=device)
    maps = grad_cam(model, batch, targets).cpu()
    explained = []
    for number, ((index, image, label), cam) in enumerate(zip(wanted, maps, strict=True)):
        images[f"gradcam_{number}"] = png_bytes(
            overlay(input_view(image, model.preprocessing), cam)
        )
        explained.append({"index": index, "label": model.classes[label]})
    return explained


def _decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
