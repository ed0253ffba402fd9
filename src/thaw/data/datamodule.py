"""The LightningDataModule: one source, its splits, the transforms and the loaders."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from thaw.data.augment.batch import BatchAugment
from thaw.data.augment.mixing import BatchMix
from thaw.data.augment.options import AugmentOptions
from thaw.data.augment.per_image import build_train_transform
from thaw.data.images import find_unreadable, load_image
from thaw.data.loader_choice import LOADERS, LoaderChoice, choose_loader
from thaw.data.resumable import (
    DeviceLoader,
    PositionedLoader,
    ResumableLoader,
    balanced_weights,
)
from thaw.data.sources.base import ImageSet, Source
from thaw.data.split import fold_split, join, limit_per_class, select_classes, split_imageset
from thaw.data.stats import NORMALIZE, resolve_preprocessing
from thaw.preprocess import Preprocessing

log = logging.getLogger(__name__)

_SHOWN_BAD_FILES = 5
T = TypeVar("T")


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


# data.sampler: `random` visits every training image once an epoch; `balanced` draws as many
# images with replacement, every class equally often (a catalogue with 10x more of one class).
SAMPLERS = ("random", "balanced")


class ImageDataModule(pl.LightningDataModule):
    """Turns a source's train/test (and maybe val) images into the three loaders.

    `setup` applies, in order: the `classes` filter (every split, labels renumbered in the order
    given); with `skip_bad_images`, drops the files that do not decode (checked once, so a bad
    photo cannot stop a long run mid-epoch; without it the first bad file fails with its path);
    stratified, seeded `test_fraction` and `val_fraction` splits of train for the sets the source
    lacks (val_fraction 0 leaves validation empty); the `samples_per_class` limit on train only,
    so few-shot runs are still validated and tested on full sets. With `folds` (K-fold
    cross-validation) the training pool, the source's own validation set included, is first
    limited to `samples_per_class`, then fold `fold` of a stratified, seeded split into `folds`
    parts is the validation set and the others train; `val_fraction` is then unused. Then it
    resolves the run's `preprocessing` (see thaw.data.stats: `image_size`, and `mean`/`std`,
    the backbone's, or with `normalize="dataset"` the training split's) unless one is given, as
    a trained model's is, chooses the data path and builds that path's transforms. `augment` is
    the augment group; its MixUp/CutMix run on training batches after they reach the device.
    `root` is the config's user-facing `data.root`, which the config interpolates into the
    source.

    `sampler` is how an epoch draws training images (SAMPLERS). `loader` asks for a data path
    (see thaw.data.loader_choice): `device` keeps an in-memory set on the training device as
    uint8 and augments whole batches there; `dataloader` decodes and augments image by image in
    workers (image folders, and the per-image policies); `auto` takes `device` where it can.
    `test_only` (with a given `preprocessing`) reads only the test images where the source has
    its own test set, so a model can be evaluated where only they exist.
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
        folds: int | None = None,
        fold: int | None = None,
        skip_bad_images: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        pin_memory: bool = False,
        loader: str = "auto",
        sampler: str = "random",
        root: str | Path | None = None,
        seed: int | None = None,
        preprocessing: Preprocessing | None = None,
        test_only: bool = False,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("split_seed", split_seed)
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
        ):
            raise ValueError(
                f"data.image_size must be an integer >= 1, null (the images' own size) or auto "
                f"(the model's input size), got {image_size!r}"
            )
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, minimum=1, nullable=True)
        if samples_per_class is not None:
            _check_int("samples_per_class", samples_per_class, minimum=1, nullable=True)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        _check_folds(folds, fold)
        if normalize not in NORMALIZE:
            raise ValueError(f"data.normalize must be one of {list(NORMALIZE)}, got {normalize!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if loader not in LOADERS:
            raise ValueError(f"data.loader must be one of {list(LOADERS)}, got {loader!r}")
        if isinstance(classes, str):
            raise ValueError(f"data.classes must be a list of class names or null, got {classes!r}")
        if not isinstance(skip_bad_images, bool):
            raise ValueError(f"data.skip_bad_images must be true or false, got {skip_bad_images!r}")
        if test_only and preprocessing is None:
            raise ValueError("a test_only DataModule needs the trained model's preprocessing")
        self.source = source
        self.root = Path(root) if root is not None else None
        self.augment = AugmentOptions.parse(augment)
        self.image_size = image_size
        self.normalize = normalize
        self.backbone_mean, self.backbone_std = list(mean), list(std)
        self.preprocessing = preprocessing
        self.requested_loader = loader
        self.sampler = sampler
        self.loader_choice: LoaderChoice | None = None
        self.test_only = test_only
        self.class_filter = [str(name) for name in classes] if classes is not None else None
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.samples_per_class = samples_per_class
        self.folds, self.fold = folds, fold
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
        loaded = self.train_set if self.train_set is not None else self.test_set
        return self._require(loaded).classes

    @property
    def loader(self) -> str:
        """The data path chosen at setup: "device" or "dataloader"."""
        return self._require(self.loader_choice).path

    @property
    def _decode_size(self) -> int | None:
        """The side a JPEG may be decoded down to: what the preprocessing resizes to."""
        return self.preprocessing.resize_size if self.preprocessing else self.image_size

    def prepare_data(self) -> None:
        """Put the data on disk (downloads happen here, on one process); a test_only module
        reads its test images in setup, fetching them there if it must."""
        if not self.test_only:
            self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load, check, split, resolve the preprocessing and build the transforms once; later
        calls (one per stage) change nothing."""
        if self.test_set is not None:
            return
        test = self.source.load_test() if self.test_only else None
        if test is not None:
            (test,) = self._filter(test)
            self.test_set = test
        else:
            self._load_all()
        splits = [s for s in (self.train_set, self.val_set, self.test_set) if s is not None]
        if self.preprocessing is None:
            self.preprocessing = resolve_preprocessing(
                self._require(self.train_set),
                self.image_size,
                self.normalize,
                self.backbone_mean,
                self.backbone_std,
                self.split_seed,
            )
            if self.normalize == "dataset":
                log.info("Normalising with the training split's statistics: %s", self.preprocessing)
        self.loader_choice = choose_loader(
            self.requested_loader, all(s.in_memory for s in splits), self.augment
        )
        log.info("Data path: %s (%s)", *self.loader_choice)
        self._build_transforms(self.loader_choice.path, self.preprocessing)
        if self.augment.mixes_batches:
            self.mixer = BatchMix(self.augment, len(self.classes))

    def _load_all(self) -> None:
        splits = self.source.load()
        train, val, test = self._filter(splits.train, splits.val, splits.test)
        self._check_class_sizes(train, test is None, val is None)
        if test is None:
            train, test = split_imageset(train, self.test_fraction, self.split_seed)
        if self.folds is not None:
            pool = train if val is None else join(train, val)
            if self.samples_per_class is not None:
                pool = limit_per_class(pool, self.samples_per_class, self.split_seed)
            train, val = fold_split(pool, self.folds, self.fold, self.split_seed)
        else:
            if val is None:
                train, val = split_imageset(train, self.val_fraction, self.split_seed)
            if self.samples_per_class is not None:
                train = limit_per_class(train, self.samples_per_class, self.split_seed)
        self.train_set, self.val_set, self.test_set = train, val, test

    def _filter(self, *imagesets: ImageSet | None) -> tuple[ImageSet | None, ...]:
        """The `classes` filter, then (with `skip_bad_images`) the files that decode."""
        if self.class_filter is not None:
            imagesets = tuple(
                select_classes(s, self.class_filter) if s is not None else None for s in imagesets
            )
        if self.skip_bad_images:
            imagesets = self._drop_unreadable(*imagesets)
        return imagesets

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
            bad = set(find_unreadable(imageset.images, self._decode_size))
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
        if split_val and self.val_fraction > 0 and self.folds is None:
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

    def _build_transforms(self, path: str, preprocessing: Preprocessing) -> None:
        """The training and evaluation transforms of the chosen data path, and only those."""
        if path == "device":
            self.train_transform: Any = BatchAugment(self.augment, preprocessing, train=True)
            self.eval_transform: Any = BatchAugment(self.augment, preprocessing, train=False)
        else:
            self.train_transform = build_train_transform(self.augment, preprocessing)
            self.eval_transform = preprocessing.transform()

    def _loader(self, split: str, train: bool = False) -> PositionedLoader:
        """Every loader of `split`, on either path: training ones shuffle (sharded across ranks)
        and augment; the others see every image once, in order, on every rank."""
        images = self._require(getattr(self, f"{split}_set"))
        batch_size = self.batch_size if train else self.eval_batch_size
        balanced = train and self.sampler == "balanced"
        weights = balanced_weights(images.labels) if balanced else None
        if self.loader == "device":
            device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
            if images.images.device != torch.device(device):  # type: ignore[union-attr]
                # Moved once and kept: the loaders of a split (fit, feature cache, test) share it.
                images = ImageSet(
                    images.images.to(device), images.labels.to(device), images.classes
                )
                setattr(self, f"{split}_set", images)
            transform = self.train_transform if train else self.eval_transform
            return DeviceLoader(
                images.images,  # type: ignore[arg-type]
                images.labels,
                transform,  # type: ignore[arg-type]
                seed=self.seed,
                batch_size=batch_size,
                shuffle=train,
                device=device,
                weights=weights,
            )
        return ResumableLoader(
            ImageDataset(
                images, self.train_transform if train else self.eval_transform, self._decode_size
            ),
            seed=self.seed,
            shuffle=train,
            labels=images.labels,
            weights=weights,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    @staticmethod
    def _require(value: T | None) -> T:
        """What setup() makes."""
        if value is None:
            raise RuntimeError("ImageDataModule.setup() has not run yet")
        return value


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


def _check_folds(folds: Any, fold: Any) -> None:
    """K-fold needs both values, or neither: data.folds=5 data.fold=2."""
    if folds is None:
        if fold is not None:
            raise ValueError(f"data.fold={fold!r} needs data.folds (e.g. data.folds=5)")
        return
    _check_int("folds", folds, minimum=2)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(
            f"data.folds={folds} needs data.fold, the fold to validate on: an integer in "
            f"[0, {folds - 1}], got {fold!r}. Run all folds with -m data.fold="
            + ",".join(str(k) for k in range(folds))
        )
