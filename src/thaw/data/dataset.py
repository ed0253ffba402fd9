"""An ImageSet as a torch Dataset, and the ImageSets without their unreadable files."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from thaw.data.images import find_unreadable, load_image
from thaw.data.sources.base import ImageSet

log = logging.getLogger(__name__)

_SHOWN_BAD_FILES = 5


class ImageDataset(Dataset):
    """Serves both kinds of ImageSet: in-memory uint8 tensors are indexed, files are decoded (a JPEG
    at a reduced scale when `min_size`, the size it is resized to, allows)."""

    def __init__(
        self,
        images: ImageSet,
        transform: Callable[[Any], torch.Tensor],
        min_size: int | None = None,
    ) -> None:
        self.images = images
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.images.images[index]
        image = item if isinstance(item, torch.Tensor) else load_image(item, self.min_size)
        return self.transform(image), int(self.images.labels[index])


def drop_unreadable(
    imagesets: tuple[ImageSet | None, ...], decode_size: int | None
) -> tuple[tuple[ImageSet | None, ...], list[Path]]:
    """The sets without the files that fail to decode, and those files (logged, a few by
    path); in-memory sets are kept as they are."""
    kept: list[ImageSet | None] = []
    skipped: list[Path] = []
    for imageset in imagesets:
        if imageset is None or imageset.in_memory:
            kept.append(imageset)
            continue
        bad = set(find_unreadable(imageset.images, decode_size))
        skipped += [path for path in imageset.images if path in bad]
        good = [i for i, path in enumerate(imageset.images) if path not in bad]
        kept.append(imageset.subset(torch.tensor(good, dtype=torch.long)))
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:_SHOWN_BAD_FILES])
        more = len(skipped) - _SHOWN_BAD_FILES
        log.warning(
            "Skipped %d images that could not be decoded (data.skip_bad_images=true): %s%s",
            len(skipped),
            shown,
            f" and {more} more" if more > 0 else "",
        )
    return tuple(kept), skipped
