"""Human-facing renderings of results: the confusion matrix as an image, the metrics as JSON,
benchmark tables as markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def metric_tag(class_name: str) -> str:
    """A class name usable in a metric name (TensorBoard treats '/' as a folder) or in a file
    name."""
    return class_name.replace("/", "_").replace(" ", "_")


def confusion_matrix_image(
    matrix: list[list[int]], classes: list[str], cell: int = 36
) -> np.ndarray:
    """An HWC uint8 picture of a confusion matrix (rows: true class, columns: predicted), each
    cell shaded by its share of the row and labelled with its count."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    margin = 24 + 7 * max(len(c) for c in classes)
    size = (margin + n * cell + 8, margin + n * cell + 8)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        draw.text((4, margin + i * cell + cell // 3), f"{i} {classes[i]}", fill="black")
        draw.text((margin + i * cell + 2, margin - 14), str(i), fill="black")
        for j in range(n):
            shade = int(255 * (1 - shares[i, j]))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255))
            draw.text(
                (x + 3, y + cell // 3), str(counts[i, j]), fill="white" if shade < 128 else "black"
            )
    return np.asarray(image)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """metrics.json: the scalar test metrics plus per-class accuracy and the confusion matrix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def markdown_table(table: list[list[str]]) -> str:
    """Rows of cells, the first row the header, as a GitHub markdown table."""
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def text_table(rows: list[list[str]] | list[tuple[str, ...]]) -> str:
    """Rows of cells, the first row the header, as aligned plain-text columns for a terminal."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
