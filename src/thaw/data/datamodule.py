"""The LightningDataModule: one source, its splits, the transforms and the loaders."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from thaw.data.augment import AugmentOptions
from thaw.data.base import ImageSet, Source
from thaw.data.batch_augment import BatchAugment, unsupported
from thaw.data.images import find_unreadable, load_image
from thaw.data.mixing import BatchMix
from thaw.data.resumable import DeviceLoader, PositionedLoader, ResumableLoader
from thaw.data.split import limit_per_class, select_classes, split_imageset
from thaw.data.stats import dataset_stats
from thaw.data.transforms import build_eval_transform, build_train_transform

log = logging.getLogger(__name__)


NORMALIZE = ("backbone", "dataset")
LOADERS = ("auto", "device", "dataloader")
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


class ImageDataModule(pl.LightningDataModule):
    """Turns a source's train/test (and maybe val) images into the three loaders.

    `setup` applies, in order: the `classes` filter (every split, labels renumbered in the order
    given); with `skip_bad_images`, drops the files that do not decode (checked once, so a bad
    photo cannot stop a long run mid-epoch; without it the first bad file fails with its path);
    stratified, seeded `test_fraction` and `val_fraction` splits of train for the sets the source
    lacks (val_fraction 0 leaves validation empty); the `samples_per_class` limit on train only,
    so few-shot runs are still validated and tested on full sets. Then it builds the transforms,
    normalised with `mean`/`std` (the backbone's, from the training code) or, with
    `normalize="dataset"`, with statistics of the training split. `augment` is the augment group;
    its MixUp/CutMix run on training batches after they reach the device. `root` is the config's
    user-facing `data.root`, which the config interpolates into the source.

    `loader` picks the data path: `device` keeps an in-memory set on the training device as uint8
    and augments whole batches there; `dataloader` decodes and augments image by image in
    workers (image folders, and the per-image policies); `auto` takes `device` where it can.
    """

    def __init__(
        self,
        source: Source,
        augment: AugmentOptions | Mapping[str, Any] | None,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int | None = None,
        normalize: str = "backbone",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        classes: Sequence[str] | None = None,
        samples_per_class: int | None = None,
        skip_bad_images: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        pin_memory: bool = False,
        loader: str = "auto",
        root: str | Path | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("split_seed", split_seed)
        if image_size is not None:
            _check_int("image_size", image_size, minimum=1, nullable=True)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, minimum=1, nullable=True)
        if samples_per_class is not None:
            _check_int("samples_per_class", samples_per_class, minimum=1, nullable=True)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        if normalize not in NORMALIZE:
            raise ValueError(f"data.normalize must be one of {list(NORMALIZE)}, got {normalize!r}")
        if loader not in LOADERS:
            raise ValueError(f"data.loader must be one of {list(LOADERS)}, got {loader!r}")
        if isinstance(classes, str):
            raise ValueError(f"data.classes must be a list of class names or null, got {classes!r}")
        if not isinstance(skip_bad_images, bool):
            raise ValueError(f"data.skip_bad_images must be true or false, got {skip_bad_images!r}")
        self.source = source
        self.root = Path(root) if root is not None else None
        self.augment = AugmentOptions.parse(augment)
        self.image_size = image_size
        self.normalize = normalize
        self.mean, self.std = list(mean), list(std)
        self.loader = loader
        self._build_transforms()
        self.class_filter = [str(name) for name in classes] if classes is not None else None
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.samples_per_class = samples_per_class
        self.skip_bad_images = skip_bad_images
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        # Training order and augmentation; an unseeded run draws one (its loader state keeps it).
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.pin_memory = pin_memory
        self.train_set: ImageSet | None = None
        self.val_set: ImageSet | None = None
        self.test_set: ImageSet | None = None
        self.skipped_images: list[Path] = []
        self.mixer: BatchMix | None = None

    @property
    def classes(self) -> list[str]:
        """Class names, label i = classes[i], after the `classes` filter."""
        return self._require(self.train_set).classes

    def prepare_data(self) -> None:
        """Put the data on disk (downloads happen here, on one process)."""
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load, check, split and build the transforms once; later calls (one per stage) change
        nothing."""
        if self.train_set is not None:
            return
        splits = self.source.load()
        train, val, test = splits.train, splits.val, splits.test
        if self.class_filter is not None:
            train, val, test = (
                select_classes(s, self.class_filter) if s is not None else None
                for s in (train, val, test)
            )
        if self.skip_bad_images:
            train, val, test = self._drop_unreadable(train, val, test)
        self._check_class_sizes(train, test is None, val is None)
        if test is None:
            train, test = split_imageset(train, self.test_fraction, self.split_seed)
        if val is None:
            train, val = split_imageset(train, self.val_fraction, self.split_seed)
        if self.samples_per_class is not None:
            train = limit_per_class(train, self.samples_per_class, self.split_seed)
        self.train_set, self.val_set, self.test_set = train, val, test
        if self.normalize == "dataset":
            self.mean, self.std = dataset_stats(train, self.split_seed, self.image_size)
            log.info("Normalising with the training split's mean %s, std %s", self.mean, self.std)
            self._build_transforms()
        self.loader = self._resolve_loader(train, val, test)
        if self.augment.mixes_batches:
            self.mixer = BatchMix(self.augment, len(train.classes))

    def train_dataloader(self) -> PositionedLoader:
        """Resumable mid-epoch: order and augmentation are functions of (seed, epoch, image)."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> PositionedLoader:
        return self._loader("val")

    def test_dataloader(self) -> PositionedLoader:
        return self._loader("test")

    def plain_loader(self, split: str) -> PositionedLoader:
        """Every image of `split` ("train", "val" or "test") once, in order, through the
        deterministic evaluation transform: what a frozen backbone's features are cached from."""
        return self._loader(split)

    def mix(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """A training batch through MixUp/CutMix: (images, labels, soft_targets) when the augment
        group mixes batches, else the batch as it is."""
        return self.mixer(*batch) if self.mixer is not None else batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Mix training batches on the device; validation, test and predict batches stay
        (images, labels)."""
        if self.trainer is not None and self.trainer.training:
            return self.mix(batch)
        return batch

    def _drop_unreadable(self, *imagesets: ImageSet | None) -> tuple[ImageSet | None, ...]:
        """The sets without the files that fail to decode, counted and logged with a few paths."""
        kept: list[ImageSet | None] = []
        for imageset in imagesets:
            if imageset is None or imageset.in_memory:
                kept.append(imageset)
                continue
            bad = set(find_unreadable(imageset.images, self.image_size))
            self.skipped_images += [path for path in imageset.images if path in bad]
            good = [i for i, path in enumerate(imageset.images) if path not in bad]
            kept.append(imageset.subset(torch.tensor(good, dtype=torch.long)))
        if self.skipped_images:
            shown = ", ".join(str(p) for p in self.skipped_images[:_SHOWN_BAD_FILES])
            more = len(self.skipped_images) - _SHOWN_BAD_FILES
            log.warning(
                "Skipped %d images that could not be decoded (data.skip_bad_images=true): %s%s",
                len(self.skipped_images),
                shown,
                f" and {more} more" if more > 0 else "",
            )
        return tuple(kept)

    def _check_class_sizes(self, train: ImageSet, split_test: bool, split_val: bool) -> None:
        """Every class needs one training image plus one for each split taken off train: say
        which class falls short, rather than fail inside the split arithmetic."""
        if split_test and self.test_fraction == 0:
            raise ValueError(
                "the data has no test split of its own (no test/ folder) and data.test_fraction "
                "is 0: give a test/ folder or a data.test_fraction in (0, 1)"
            )
        held = [f"test (data.test_fraction={self.test_fraction:g})"] if split_test else []
        if split_val and self.val_fraction > 0:
            held.append(f"validation (data.val_fraction={self.val_fraction:g})")
        needed = 1 + len(held)
        sizes = torch.bincount(train.labels, minlength=len(train.classes)).tolist()
        short = [(name, n) for name, n in zip(train.classes, sizes, strict=True) if n < needed]
        if short:
            listed = ", ".join(f"{name!r} has {n}" for name, n in short)
            splits = " and ".join(["training", *held])
            raise ValueError(
                f"too few images per class: {listed}; each class needs at least {needed} "
                f"(one for each of {splits}). Add images, or give val/ and test/ folders"
            )

    def _build_transforms(self) -> None:
        """Both paths' transforms from the current statistics; the per-image ones also check the
        augment options, the batch ones whether an explicit `loader=device` can do them."""
        args = (self.image_size, self.mean, self.std)
        self.train_transform = build_train_transform(self.augment, *args)
        self.eval_transform = build_eval_transform(*args)
        batchable = not unsupported(self.augment) or self.loader == "device"  # else it raises
        self.batch_train_transform = (
            BatchAugment(self.augment, *args, train=True) if batchable else None
        )
        self.batch_eval_transform = BatchAugment(self.augment, *args, train=False)

    def _resolve_loader(self, *imagesets: ImageSet | None) -> str:
        """`auto` becomes `device` when every split is in memory and the augmentations batch."""
        in_memory = all(s is None or s.in_memory for s in imagesets)
        if self.loader == "device" and not in_memory:
            raise ValueError(
                "data.loader=device needs a data set held in memory (cifar10, fashion_mnist, "
                "tiny_imagenet); image files stream from disk: use data.loader=dataloader"
            )
        if self.loader != "auto":
            return self.loader
        if not in_memory or self.batch_train_transform is None:
            why = (
                "images are files"
                if not in_memory
                else f"{', '.join(unsupported(self.augment))} only per image"
            )
            log.info("data.loader=auto: the per-image DataLoader path (%s)", why)
            return "dataloader"
        return "device"

    def _loader(self, split: str, train: bool = False) -> PositionedLoader:
        """Every loader of `split`, on either path: training ones shuffle (sharded across ranks)
        and augment; the others see every image once, in order, on every rank."""
        images = self._require(getattr(self, f"{split}_set"))
        batch_size = self.batch_size if train else self.eval_batch_size
        if self.loader == "device":
            device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
            if images.images.device != torch.device(device):  # type: ignore[union-attr]
                # Moved once and kept: the loaders of a split (fit, feature cache, test) share it.
                images = ImageSet(
                    images.images.to(device), images.labels.to(device), images.classes
                )
                setattr(self, f"{split}_set", images)
            transform = self.batch_train_transform if train else self.batch_eval_transform
            return DeviceLoader(
                images.images,  # type: ignore[arg-type]
                images.labels,
                transform,  # type: ignore[arg-type]
                seed=self.seed,
                batch_size=batch_size,
                shuffle=train,
                device=device,
            )
        transform = self.train_transform if train else self.eval_transform
        return ResumableLoader(
            ImageDataset(images, transform, self.image_size),
            seed=self.seed,
            shuffle=train,
            labels=images.labels,
            batch_size=batch_size,
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


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"data.{name} must be a number in [0, 1), got {value!r}")
