"""An ImageSet as a torch Dataset, and the sets checked to decode: an error, or without the
files that do not."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from thaw.data.images import ImageDecodeError, load_image
from thaw.data.sources.base import ImageSet
from thaw.data.verify import verify_files

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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        """(image, class index), or (image, multi-hot row) for multi-label data."""
        item = self.images.images[index]  # a tensor, unless the set is files
        image = item if isinstance(item, torch.Tensor) else load_image(item, self.min_size)
        label = self.images.labels[index]
        return self.transform(image), label if self.images.multilabel else int(label)


def readable_splits(
    splits: dict[str, ImageSet | None], decode_size: int | None, skip: bool
) -> tuple[dict[str, ImageSet | None], list[Path]]:
    """`splits` (by name: "train", "val", "test") once every file of every split is checked to
    decode (thaw.data.verify), before any training, so a bad test image cannot end a long run.
    A bad file is an ImageDecodeError naming it and its split, unless `skip`
    (data.skip_bad_images): then the sets are returned without the bad files, which are logged,
    a few by path, and returned too. In-memory sets are decoded already and kept as they are."""
    on_disk = {name: s for name, s in splits.items() if s is not None and s.in_files}
    files = [path for imageset in on_disk.values() for path in imageset.images]
    bad = verify_files(files, decode_size).bad if files else {}
    found = [(name, path) for name, s in on_disk.items() for path in s.images if path in bad]
    if not found:
        return splits, []
    if not skip:
        shown = "; ".join(
            f"could not decode image {path} ({name} split): {bad[path]}"
            for name, path in found[:_SHOWN_BAD_FILES]
        )
        raise ImageDecodeError(
            f"Image files that do not decode ({len(found)}, checked before the first step): "
            f"{shown}{_more(len(found))}. Replace or remove them, or set "
            "data.skip_bad_images=true to skip them"
        )
    skipped = [path for _, path in found]
    log.warning(
        "Skipped %d images that could not be decoded (data.skip_bad_images=true): %s%s",
        len(skipped),
        ", ".join(str(p) for p in skipped[:_SHOWN_BAD_FILES]),
        _more(len(skipped)),
    )
    return {name: _without(s, bad) for name, s in splits.items()}, skipped


def _without(imageset: ImageSet | None, bad: dict[Path, str]) -> ImageSet | None:
    if imageset is None or not imageset.in_files:
        return imageset
    good = [i for i, path in enumerate(imageset.images) if path not in bad]
    return imageset.subset(torch.tensor(good, dtype=torch.long))


def _more(count: int) -> str:
    more = count - _SHOWN_BAD_FILES
    return f" and {more} more" if more > 0 else ""
