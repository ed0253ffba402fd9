"""The shapes every data source returns, so the DataModule never cares where images came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True)
class ImageSet:
    """Labelled images: a uint8 tensor (N, C, H, W) held in memory, or a list of image files.

    `classes[i]` is the name of label i; C is 1 (grayscale) or 3 (RGB).
    """

    images: torch.Tensor | list[Path]
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, torch.Tensor)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at `indices`, same classes."""
        if self.in_memory:
            images = self.images[indices]
        else:
            images = [self.images[i] for i in indices.tolist()]
        return ImageSet(images, self.labels[indices], self.classes)


@dataclass(frozen=True)
class Splits:
    """What a source provides: its training set and, where it has them, its official test and
    validation sets (the DataModule splits a missing one off `train`)."""

    train: ImageSet
    test: ImageSet | None = None
    val: ImageSet | None = None


class Source(Protocol):
    """What the DataModule needs from a source: `prepare` puts the data on disk (downloading if it
    may; run once, on one process), `load` reads it."""

    def prepare(self) -> None: ...

    def load(self) -> Splits: ...
