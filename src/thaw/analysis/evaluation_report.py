"""The evaluation report: where the model is wrong, why it decides what it decides, and whether
its confidence can be believed, in report.json and a self-contained report.html.

eval.py and the test at the end of train.py write it next to metrics.json, and put its figures
into TensorBoard under test/.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

from thaw.analysis.calibration import (
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from thaw.analysis.figures import (
    accuracy_coverage,
    confusion_figure,
    reliability_figure,
    score_histograms,
)
from thaw.analysis.gradcam import grad_cam, overlay, target_layer
from thaw.analysis.html import png_bytes, render
from thaw.analysis.interpretation import (
    Collected,
    Example,
    collect,
    confusion_matrix,
    headline,
    most_confused,
    per_class,
)
from thaw.models.network import ImageClassifier
from thaw.preprocess import Preprocessing

log = logging.getLogger(__name__)

TOP_LOSSES = 12
CONFUSED_PAIRS = 10
EXAMPLES_PER_PAIR = 3
GRADCAM_CLASSES = 16  # one correct image each, for at most this many classes
BINS = 15


def write_report(
    model: ImageClassifier,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    output_dir: Path,
    run_config: dict[str, Any],
    checkpoint: str | None = None,
    wall_time_s: float | None = None,
    tensorboard: Sequence[Any] = (),
    open_set: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Analyse `model` on the test `batches` and write report.json and report.html into
    `output_dir`; the figures also go to each TensorBoard SummaryWriter of `tensorboard`.
    `open_set` (eval's `ood=`: thaw.openset.evaluation.open_set_metrics, with `ood` the folder)
    adds the rejection rule's section. Returns report.json's content."""
    model.eval()
    preprocessing: Preprocessing = model.preprocessing
    temperature = model.postprocessing.temperature
    data = collect(model, batches, temperature, mistakes=CONFUSED_PAIRS * EXAMPLES_PER_PAIR * 8)
    classes = model.classes
    logits, labels = data.logits, data.labels
    matrix = confusion_matrix(logits.argmax(dim=-1), labels, len(classes))
    table = per_class(matrix, classes)
    images: dict[str, bytes] = {"confusion": confusion_figure(matrix, classes)}

    pairs = _confused_pairs(matrix, data, classes, preprocessing, images)
    top_losses = data.mistakes[:TOP_LOSSES]
    loss_overlays = _explained(model, top_losses, [x.predicted for x in top_losses])
    correct = _stratified_correct(data, GRADCAM_CLASSES)
    correct_overlays = _explained(model, correct, [x.label for x in correct])
    for name, pictures in (("top_loss", loss_overlays), ("gradcam", correct_overlays)):
        images.update({f"{name}_{i}": png_bytes(p) for i, p in enumerate(pictures)})

    calibration = _calibration(logits, labels, temperature)
    after = f"after (T={temperature:.2f})"
    bins = {"before": calibration["bins"], after: calibration["bins_calibrated"]}
    images["reliability"] = reliability_figure(bins)
    report = {
        "summary": summary(run_config, classes, checkpoint, wall_time_s),
        "metrics": headline(logits, labels, table),
        "test_images": len(labels),
        "per_class": sorted(table, key=lambda row: (row["f1"], row["class"])),
        "confusion_matrix": matrix.tolist(),
        "most_confused": pairs,
        "top_losses": [_describe(x, classes) for x in top_losses],
        "gradcam": {
            "layer": layer_name(model),
            "max_classes": GRADCAM_CLASSES,
            "correct": [
                {"index": x.index, "class": classes[x.label], "prob": x.prob} for x in correct
            ],
        },
        "calibration": calibration,
        "model_size": model_size(model, preprocessing.input_size),
    }
    if open_set is not None:
        report["open_set"] = _open_set(model, open_set, images)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.html").write_text(render(report, images))
    for writer in tensorboard:
        _to_tensorboard(writer, images, loss_overlays, correct_overlays)
    log.info("Report written to %s", output_dir / "report.html")
    return report


def _open_set(
    model: ImageClassifier, figures: dict[str, Any], images: dict[str, bytes]
) -> dict[str, Any]:
    """The open-set section's values, its figures added to `images`."""
    curves, rule = figures["curves"], model.postprocessing.rejection
    images["ood_scores"] = score_histograms(
        curves["known_scores"], curves["ood_scores"], curves["threshold"]
    )
    images["coverage"] = accuracy_coverage(
        curves["coverage"], curves["accuracy"], figures["test/known_kept"]
    )
    values = {k.removeprefix("test/"): v for k, v in figures.items() if k.startswith("test/")}
    return {
        "score": rule.score,
        "threshold": rule.threshold,
        "keep": rule.keep,
        "ood": figures["ood"],
        "ood_images": len(curves["ood_scores"]),
        **values,
        "accuracy_coverage": {"coverage": curves["coverage"], "accuracy": curves["accuracy"]},
    }


def _confused_pairs(
    matrix: torch.Tensor,
    data: Collected,
    classes: list[str],
    preprocessing: Preprocessing,
    images: dict[str, bytes],
) -> list[dict[str, Any]]:
    """The most confused (true, predicted) pairs with a few of their test images, whose
    pictures are added to `images`."""
    pairs = []
    for true, predicted, count in most_confused(matrix, CONFUSED_PAIRS):
        chosen = [x for x in data.mistakes if (x.label, x.predicted) == (true, predicted)]
        chosen = chosen[:EXAMPLES_PER_PAIR]
        for i, example in enumerate(chosen):
            images[f"confused_{true}_{predicted}_{i}"] = png_bytes(
                input_view(example.image, preprocessing)
            )
        pairs.append(
            {
                "true": classes[true],
                "predicted": classes[predicted],
                "true_index": true,
                "predicted_index": predicted,
                "count": count,
                "examples": [x.index for x in chosen],
            }
        )
    return pairs


def summary(
    config: dict[str, Any], classes: list[str], checkpoint: str | None, wall_time_s: float | None
) -> dict[str, Any]:
    """The run in a few words: model, strategy, data, images per class, epochs, wall time."""
    data = config.get("data", {})
    source = data.get("source", {}).get("_target_", data.get("_target_", "?"))
    per_class_limit = data.get("samples_per_class")
    return {
        "model": config.get("model", {}).get("name", "?"),
        "strategy": config.get("finetune", {}).get("_target_", "?").rsplit(".", 1)[-1],
        "data": source.rsplit(".", 1)[-1],
        "classes": len(classes),
        "images_per_class": per_class_limit if per_class_limit is not None else "all",
        "epochs": config.get("trainer", {}).get("max_epochs", "?"),
        "wall_time": f"{wall_time_s:.0f} s" if wall_time_s is not None else "not recorded",
        "checkpoint": checkpoint or "the weights at the end of training",
    }


def model_size(model: torch.nn.Module, input_size: int) -> dict[str, Any]:
    """Parameters, megabytes of weights and buffers, and FLOPs for one image (PyTorch's flop
    counter, which counts a multiply-add as 2)."""
    tensors = [*model.parameters(), *model.buffers()]
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "megabytes": sum(t.numel() * t.element_size() for t in tensors) / 1e6,
        "flops_per_image": int(counter.get_total_flops()),
        "input_size": input_size,
    }


def _calibration(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    before, after = logits.softmax(dim=-1), (logits / temperature).softmax(dim=-1)
    return {
        "temperature": temperature,
        "ece": expected_calibration_error(before, labels, BINS),
        "ece_calibrated": expected_calibration_error(after, labels, BINS),
        "nll": negative_log_likelihood(logits, labels),
        "nll_calibrated": negative_log_likelihood(logits, labels, temperature),
        "bins": reliability_bins(before, labels, BINS),
        "bins_calibrated": reliability_bins(after, labels, BINS),
    }


def _stratified_correct(data: Collected, max_classes: int) -> list[Example]:
    """One correct example per class, for up to `max_classes` classes spread over the range."""
    with_examples = sorted(data.correct)
    if len(with_examples) > max_classes:
        step = len(with_examples) / max_classes
        with_examples = [with_examples[int(i * step)] for i in range(max_classes)]
    return [data.correct[c][0] for c in with_examples]


def _explained(
    model: ImageClassifier, examples: list[Example], targets: list[int]
) -> list[Image.Image]:
    """Each example's view with the Grad-CAM map of its target class on top."""
    if not examples:
        return []
    device = next(model.parameters()).device
    batch = torch.stack([x.image for x in examples]).to(device)
    maps = grad_cam(model, batch, torch.tensor(targets, device=device)).cpu()
    return [
        overlay(input_view(x.image, model.preprocessing), cam)
        for x, cam in zip(examples, maps, strict=True)
    ]


def input_view(image: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """A model's input (3, H, W) as a uint8 picture: the normalisation undone."""
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    pixels = (image.float() * std + mean).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8)


def _describe(example: Example, classes: list[str]) -> dict[str, Any]:
    return {
        "index": example.index,
        "true": classes[example.label],
        "predicted": classes[example.predicted],
        "prob": example.prob,
        "loss": example.loss,
    }


def layer_name(model: ImageClassifier) -> str:
    """Where Grad-CAM looked, e.g. backbone.layer2 (see target_layer)."""
    layer = target_layer(model)
    return next(name for name, module in model.named_modules() if module is layer)


def _to_tensorboard(
    writer: Any, images: dict[str, bytes], losses: list[Image.Image], correct: list[Image.Image]
) -> None:
    """test/reliability, test/top_losses and test/gradcam (the confusion matrix is logged with
    the metrics)."""
    decoded = np.asarray(Image.open(io.BytesIO(images["reliability"])).convert("RGB"))
    writer.add_image("test/reliability", decoded, dataformats="HWC")
    for tag, pictures in (("test/top_losses", losses), ("test/gradcam", correct)):
        if pictures:
            tensors = [
                torch.from_numpy(np.array(p.convert("RGB"))).permute(2, 0, 1) for p in pictures
            ]
            writer.add_image(tag, make_grid(tensors, nrow=6, padding=2))
    writer.flush()
