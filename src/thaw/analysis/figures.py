"""The report's figures as PNG bytes: the confusion matrix, the reliability diagram and the
open-set figures (score histograms, accuracy against coverage).

matplotlib with the Agg backend (no display), one figure at a time, closed after saving.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Beyond this many classes the matrix shows the classes of the most-confused pairs only.
READABLE_CLASSES = 20
# Up to this many, each cell is labelled with its value (text is most of a figure's drawing time).
LABELLED_CLASSES = 12


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def confused_classes(matrix: torch.Tensor, limit: int = READABLE_CLASSES) -> list[int]:
    """Every class when there are at most `limit`; else the `limit` classes that take part in
    the most mistakes (as true or predicted class), in class order."""
    n = matrix.shape[0]
    if n <= limit:
        return list(range(n))
    off = matrix.clone().double()
    off.fill_diagonal_(0)
    involvement = off.sum(dim=0) + off.sum(dim=1)
    return sorted(involvement.argsort(descending=True, stable=True)[:limit].tolist())


def confusion_figure(matrix: torch.Tensor, classes: Sequence[str]) -> bytes:
    """Counts and row-normalised shares side by side (rows: true class), for the classes
    `confused_classes` keeps; cells are labelled up to LABELLED_CLASSES classes."""
    shown = confused_classes(matrix)
    counts = matrix[shown][:, shown].numpy()
    rows = matrix[shown].sum(dim=1, keepdim=True).clamp(min=1).numpy()  # the whole row's total
    shares = counts / rows
    names = [classes[i] for i in shown]
    side = max(4.0, 0.45 * len(shown) + 2)
    figure, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side + 1), layout="constrained")
    for axis, values, title, fmt in (
        (axes[0], counts, "counts", "d"),
        (axes[1], shares, "share of the true class", ".2f"),
    ):
        axis.imshow(values, cmap="Blues", vmin=0)
        axis.set_title(title)
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
        axis.set_yticks(range(len(names)), names, fontsize=8)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        if len(names) <= LABELLED_CLASSES:
            top = values.max() or 1
            for (i, j), value in np.ndenumerate(values):
                colour = "white" if value > top / 2 else "black"
                text = format(int(value) if fmt == "d" else value, fmt)
                axis.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    if len(shown) < matrix.shape[0]:
        figure.suptitle(f"the {len(shown)} most-confused of {matrix.shape[0]} classes")
    return png(figure)


def reliability_figure(curves: dict[str, list[dict[str, float]]]) -> bytes:
    """Accuracy against confidence per bin, one line per curve (e.g. before and after temperature
    scaling), with the diagonal a calibrated model lies on and the share of images per bin."""
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, height_ratios=[3, 1], layout="constrained"
    )
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    width = None
    for name, bins in curves.items():
        filled = [b for b in bins if b["count"] > 0]
        confidence, accuracy = [b["confidence"] for b in filled], [b["accuracy"] for b in filled]
        top.plot(confidence, accuracy, marker="o", label=name)
        width = width or bins[0]["upper"] - bins[0]["lower"]
    first = next(iter(curves.values()))
    total = sum(b["count"] for b in first) or 1
    bottom.bar(
        [(b["lower"] + b["upper"]) / 2 for b in first],
        [b["count"] / total for b in first],
        width=width,
        color="lightsteelblue",
    )
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("share of images")
    return png(figure)


def score_histograms(known: Sequence[float], ood: Sequence[float], threshold: float) -> bytes:
    """The rejection score of known test images and of OOD images, with the threshold."""
    figure, axes = plt.subplots(figsize=(6, 3.5), layout="constrained")
    bins = np.histogram_bin_edges(np.concatenate([known, ood]), bins=40)
    axes.hist(known, bins=bins, alpha=0.6, density=True, label=f"known test ({len(known)})")
    axes.hist(ood, bins=bins, alpha=0.6, density=True, label=f"ood ({len(ood)})")
    axes.axvline(threshold, color="black", linestyle="--", label="threshold")
    axes.set_xlabel("rejection score (higher: more like the training classes)")
    axes.set_ylabel("density")
    axes.legend()
    return png(figure)


def accuracy_coverage(coverage: Sequence[float], accuracy: Sequence[float], kept: float) -> bytes:
    """Accuracy on the known images kept against the share kept, highest scores first."""
    figure, axes = plt.subplots(figsize=(5, 3.5), layout="constrained")
    axes.plot(coverage, accuracy, marker="o")
    axes.axvline(kept, color="black", linestyle="--", label=f"the threshold keeps {kept:.0%}")
    axes.set_xlabel("share of known test images kept")
    axes.set_ylabel("accuracy on those kept")
    axes.set_xlim(0, 1.02)
    axes.legend(loc="lower left")
    return png(figure)


# A multi-label report draws the precision-recall curves of this many labels, weakest AP first.
PR_CURVES = 16


def precision_recall_figure(curves: Sequence[dict]) -> bytes:
    """Small multiples, one per label: its precision-recall curve (each `curve` has `label`,
    `ap`, `precision`, `recall` lists) and the point its stored threshold gives (`at`: the
    precision and recall there)."""
    columns = min(4, len(curves))
    rows = -(-len(curves) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3 * columns, 2.6 * rows), squeeze=False, layout="constrained"
    )
    for axis, curve in zip(axes.flat, curves, strict=False):
        axis.plot(curve["recall"], curve["precision"])
        axis.plot(*reversed(curve["at"]), marker="o", color="black")
        axis.set_title(f"{curve['label']}: AP {curve['ap']:.3f}", fontsize=9)
        axis.set_xlim(0, 1.02)
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("recall", fontsize=8)
        axis.set_ylabel("precision", fontsize=8)
    for axis in list(axes.flat)[len(curves) :]:
        axis.set_visible(False)
    return png(figure)
