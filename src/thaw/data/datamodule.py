"""The LightningDataModule: one source, its splits, the transforms and the loaders."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from thaw.data.base import ImageSet, Source
from thaw.data.imagefolder import load_image
from thaw.data.split import limit_per_class, select_classes, split_imageset
from thaw.data.transforms import build_eval_transform, build_train_transform


class ImageDataset(Dataset):
    """Serves both kinds of ImageSet: in-memory uint8 tensors are indexed, files are decoded."""

    def __init__(self, images: ImageSet, transform: Callable[[Any], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.images.images[index]
        image = item if isinstance(item, torch.Tensor) else load_image(item)
        return self.transform(image), int(self.images.labels[index])


class ImageDataModule(pl.LightningDataModule):
    """Turns a source's train/test (and maybe val) images into the three loaders.

    `setup` applies, in order: the `classes` filter (every split, labels renumbered in the order
    given), a stratified `val_fraction` split of train when the source has no validation set
    (0 leaves validation empty), then the `samples_per_class` limit on train only, so few-shot runs
    are still validated and tested on full sets. `augment`, `mean` and `std` come from the training
    code (the augment group and the backbone's statistics); `root` is the config's user-facing
    `data.root`, which the config interpolates into the source.
    """

    def __init__(
        self,
        source: Source,
        augment: Mapping[str, Any] | None,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int | None = None,
        val_fraction: float = 0.1,
        classes: Sequence[str] | None = None,
        samples_per_class: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        pin_memory: bool = False,
        root: str | Path | None = None,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("split_seed", split_seed)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, minimum=1, nullable=True)
        if samples_per_class is not None:
            _check_int("samples_per_class", samples_per_class, minimum=1, nullable=True)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise ValueError(f"data.val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if isinstance(classes, str):
            raise ValueError(f"data.classes must be a list of class names or null, got {classes!r}")
        self.source = source
        self.root = Path(root) if root is not None else None
        self.class_filter = [str(name) for name in classes] if classes is not None else None
        self.val_fraction = float(val_fraction)
        self.samples_per_class = samples_per_class
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.pin_memory = pin_memory
        self.train_transform = build_train_transform(augment, image_size, mean, std)
        self.eval_transform = build_eval_transform(image_size, mean, std)
        self.train_set: ImageSet | None = None
        self.val_set: ImageSet | None = None
        self.test_set: ImageSet | None = None

    @property
    def classes(self) -> list[str]:
        """Class names, label i = classes[i], after the `classes` filter."""
        return self._require(self.train_set).classes

    def prepare_data(self) -> None:
        """Put the data on disk (downloads happen here, on one process)."""
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load and split once; later calls (one per stage) change nothing."""
        if self.train_set is not None:
            return
        splits = self.source.load()
        train, val, test = splits.train, splits.val, splits.test
        if self.class_filter is not None:
            train = select_classes(train, self.class_filter)
            test = select_classes(test, self.class_filter)
            val = select_classes(val, self.class_filter) if val is not None else None
        if val is None:
            train, val = split_imageset(train, self.val_fraction, self.split_seed)
        if self.samples_per_class is not None:
            train = limit_per_class(train, self.samples_per_class, self.split_seed)
        self.train_set, self.val_set, self.test_set = train, val, test

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_transform, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_transform, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_transform, self.eval_batch_size, shuffle=False)

    def _loader(
        self,
        images: ImageSet | None,
        transform: Callable[[Any], torch.Tensor],
        batch_size: int,
        shuffle: bool,
    ) -> DataLoader:
        return DataLoader(
            ImageDataset(self._require(images), transform),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    @staticmethod
    def _require(images: ImageSet | None) -> ImageSet:
        if images is None:
            raise RuntimeError("ImageDataModule.setup() has not run yet")
        return images


def _check_int(name: str, value: Any, minimum: int | None = None, nullable: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
    ):
        what = "an integer" if minimum is None else f"an integer >= {minimum}"
        what += " or null" if nullable else ""
        raise ValueError(f"data.{name} must be {what}, got {value!r}")
