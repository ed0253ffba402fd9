"""The LightningDataModule: it only loads. A source's sets, filtered and split as planned
(thaw.data.splits), through the chosen data path's transforms into the loaders."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch

from thaw.data.augment.batch import BatchAugment
from thaw.data.augment.mixing import BatchMix
from thaw.data.augment.options import AugmentOptions
from thaw.data.augment.per_image import build_train_transform
from thaw.data.cache import cached_set
from thaw.data.corrections import number_images
from thaw.data.dataset import ImageDataset, readable_splits
from thaw.data.loader_choice import LoaderChoice, choose_loader
from thaw.data.resumable import (
    DeviceLoader,
    PositionedLoader,
    ResumableLoader,
    StreamingLoader,
    balanced_weights,
)
from thaw.data.settings import DataSettings
from thaw.data.sources.base import SPLITS, ImageSet, Splits
from thaw.data.splits import plan_splits, select_classes
from thaw.data.stats import resolve_preprocessing
from thaw.data.unlabeled import unlabeled_pool
from thaw.errors import UserError
from thaw.preprocess import Preprocessing
from thaw.semi.fixmatch import FixMatch
from thaw.semi.stream import (
    BothViews,
    DeviceViews,
    LoadedViews,
    SemiBatch,
    SemiLoader,
    StreamPositions,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class ImageDataModule(pl.LightningDataModule):
    """Loads one source as the run's train/val/test sets and serves their loaders; `settings` is
    the data group (thaw.data.settings.DataSettings).

    `setup` applies, in order: the `classes` filter (every split, labels renumbered in the order
    given); the check that every file of every split decodes (thaw.data.verify, cached for
    unchanged files), so a bad photo cannot stop a long run mid-epoch or after it: a bad file is
    an error naming it, or with `skip_bad_images` is dropped; the split plan
    (thaw.data.splits.plan_splits); data.exclude and data.relabel (thaw.data.corrections), on
    the planned sets, so they change only the images they name. Then it resolves the run's
    `preprocessing`
    (see thaw.data.stats: `image_size`, and `mean`/`std`, the backbone's, or with
    `normalize="dataset"` the training split's) unless one is given, as a trained model's is,
    decodes the splits of files into data.cache (thaw.data.cache) where it is set, chooses the
    data path (thaw.data.loader_choice) and builds that path's transforms. A streamed source
    (data=streaming) comes split already: its sets are used as they are.
    `augment` is the augment group; its MixUp/CutMix run on training batches after they reach
    the device. `test_only` (with a given `preprocessing`) reads only the test images where the
    source has its own test set, so a model can be evaluated where only they exist.

    With `semi` (semi=fixmatch) it also loads the unlabeled pool (data.unlabeled_per_class, from
    the planned splits; data.unlabeled_root and data.unlabeled, files) and the training loader
    gives each labelled batch its unlabeled images' weak and strong views (thaw.semi.stream).
    """

    def __init__(
        self,
        settings: DataSettings,
        augment: AugmentOptions | Mapping[str, Any] | None,
        mean: Sequence[float],
        std: Sequence[float],
        preprocessing: Preprocessing | None = None,
        test_only: bool = False,
        semi: FixMatch | None = None,
    ) -> None:
        super().__init__()
        if test_only and preprocessing is None:
            raise ValueError("a test_only DataModule needs the trained model's preprocessing")
        self.settings = settings
        self.source = settings.source
        self.root = Path(settings.root) if settings.root is not None else None
        self.augment = AugmentOptions.parse(augment)
        self.backbone_mean, self.backbone_std = list(mean), list(std)
        self.preprocessing = preprocessing
        self.test_only = test_only
        self.semi = semi
        self.batch_size = settings.batch_size
        self.eval_batch_size = settings.eval_batch_size or settings.batch_size
        # Training order and augmentation; an unseeded run draws one (its loader state keeps it).
        seed = settings.seed
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.loader_choice: LoaderChoice | None = None
        self.train_set: ImageSet | None = None
        self.val_set: ImageSet | None = None
        self.test_set: ImageSet | None = None
        self.unlabeled_set: ImageSet | None = None
        self.skipped_images: list[Path] = []
        # What setup counted, for metrics.json: the images data.exclude and data.relabel touched
        # ("data/excluded", "data/relabelled"), the unlabeled pool ("data/unlabeled") and its
        # files that did not decode ("data/unlabeled_skipped").
        self.counts: dict[str, int] = {}
        self.mixer: BatchMix | None = None
        # data.cache: the decoded pixels of each split of files, by split name (see _cache).
        self.pixels: dict[str, ImageSet] = {}

    @property
    def classes(self) -> list[str]:
        """Class names, label i = classes[i], after the `classes` filter."""
        return self._loaded.classes

    @property
    def multilabel(self) -> bool:
        """Whether the labels are sets (multi-hot rows, see ImageSet.multilabel)."""
        return self._loaded.multilabel

    @property
    def _loaded(self) -> ImageSet:
        """The training set, or a test_only module's test set."""
        return self._require(self.train_set if self.train_set is not None else self.test_set)

    @property
    def loader(self) -> str:
        """The data path chosen at setup: "device", "dataloader" or "streaming"."""
        return self._require(self.loader_choice).path

    @property
    def _decode_size(self) -> int | None:
        """The side a JPEG may be decoded down to: what the preprocessing resizes to."""
        return self.preprocessing.resize_size if self.preprocessing else self.settings.image_size

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
        self._load()
        if self.preprocessing is None:
            self.preprocessing = resolve_preprocessing(
                self._require(self.train_set),
                self.settings.image_size,
                self.settings.normalize,
                self.backbone_mean,
                self.backbone_std,
                self.settings.splits.split_seed,
            )
            if self.settings.normalize == "dataset":
                log.info("Normalising with the training split's statistics: %s", self.preprocessing)
        splits = [name for name in SPLITS if getattr(self, f"{name}_set") is not None]
        self._cache(splits, self.preprocessing)
        self.loader_choice = choose_loader(
            self.settings.loader,
            all(self._loading(name).in_memory for name in splits),
            self.augment,
            cached=bool(self.pixels),
            streamed=self._loaded.streamed,
        )
        log.info("Data path: %s (%s)", *self.loader_choice)
        self._build_transforms(self.loader_choice.path, self.preprocessing)
        if self.augment.mixes_batches:
            self.mixer = BatchMix(self.augment, len(self.classes))

    def _load(self) -> None:
        """The sets, filtered, checked to decode and planned; with `test_only`, only the
        source's own test set where it has one."""
        test = self.source.load_test() if self.test_only else None
        if test is not None:
            if test.streamed:
                self._check_streaming()
            test = self._checked(test=self._filter(test))["test"]
            self.test_set = self._corrected({"test": test}, by_index=False)["test"]
            return
        source = self.source.load()
        if source.train.streamed:
            self._check_streaming()
            self.train_set, self.val_set, self.test_set = source.train, source.val, source.test
            return
        if source.train.multilabel:
            self._check_multilabel()
        loaded = number_images(source.train, source.val, source.test)
        found = self._checked(**{name: self._filter(s) for name, s in loaded.items()})
        planned = plan_splits(Splits(**found), self.settings.splits)  # type: ignore[arg-type]
        sets = {"train": planned.train, "val": planned.val, "test": planned.test}
        corrected = self._corrected({**sets, "unlabeled": planned.unlabeled})
        self.train_set, self.val_set, self.test_set = (corrected[name] for name in sets)
        if self.semi is not None:
            labelled = [self.train_set, self.val_set, self.test_set]
            pool = unlabeled_pool(
                self.settings, corrected["unlabeled"], labelled, self._decode_size
            )
            self.unlabeled_set, counts = pool
            self.counts.update(counts)

    def _cache(self, splits: Sequence[str], preprocessing: Preprocessing) -> None:
        """With data.cache, each split of image files as its decoded cache (thaw.data.cache):
        what the loaders read, index for index with the split, which keeps its paths."""
        folder = self.settings.cache_folder
        if folder is None:
            return
        for name in splits:
            images = self._require(getattr(self, f"{name}_set"))
            if not images.in_memory:
                self.pixels[name] = cached_set(images, name, folder, preprocessing)
        if not self.pixels:
            log.info("data.cache: the images are in memory already, so nothing is cached")

    def _loading(self, split: str) -> ImageSet:
        """What the loaders of `split` read: its decoded cache, else the split itself."""
        if split in self.pixels:
            return self.pixels[split]
        return self._require(getattr(self, f"{split}_set"))

    def _check_streaming(self) -> None:
        """Refuse what would change or re-read the splits that scripts/make_shards.py wrote."""
        settings, splits = self.settings, self.settings.splits
        planned = {
            "data.classes": splits.classes is not None,
            "data.samples_per_class": splits.samples_per_class is not None,
            "data.folds": splits.folds is not None,
            "data.exclude": settings.exclude is not None,
            "data.relabel": settings.relabel is not None,
        }
        unsupported = {
            "data.unlabeled_root": settings.unlabeled_root is not None,
            "data.unlabeled": settings.unlabeled is not None,
            "data.unlabeled_per_class": splits.unlabeled_per_class is not None,
            "semi=fixmatch": self.semi is not None,
            "data.sampler=balanced": settings.sampler == "balanced",
            "data.normalize=dataset": settings.normalize == "dataset",
            "data.cache": settings.cache_folder is not None,
        }
        if named := [name for name, on in planned.items() if on]:
            raise UserError(
                f"{', '.join(named)}: data=streaming trains on the splits scripts/make_shards.py "
                "wrote; give these to make_shards.py instead (python scripts/make_shards.py "
                "data=imagefolder data.root=... data.classes=[...] out=...)"
            )
        if named := [name for name, on in unsupported.items() if on]:
            raise UserError(f"{', '.join(named)}: not available with data=streaming; leave out")

    def _check_multilabel(self) -> None:
        """Refuse the settings that mean one class per image, for label sets."""
        refused = {
            "data.sampler=balanced": self.settings.sampler == "balanced",
            f"data.relabel={self.settings.relabel}": self.settings.relabel is not None,
            "semi=fixmatch": self.semi is not None,
        }
        named = [name for name, on in refused.items() if on]
        if named:
            raise UserError(
                f"{' and '.join(named)} need one class per image, but this data set is "
                "multi-label (label sets): leave them out, or give single labels"
            )

    def _corrected(
        self, sets: dict[str, ImageSet | None], by_index: bool = True
    ) -> dict[str, ImageSet | None]:
        """The planned sets with data.exclude and data.relabel applied (counted in
        `counts`)."""
        corrected, counts = self.settings.corrections.apply(sets, by_index)
        self.counts.update(counts)
        return corrected

    def _filter(self, imageset: ImageSet | None) -> ImageSet | None:
        """The `classes` filter (None stays None)."""
        names = self.settings.splits.classes
        if names is None or imageset is None:
            return imageset
        return select_classes(imageset, names)

    def _checked(self, **splits: ImageSet | None) -> dict[str, ImageSet | None]:
        """`splits` once every file decodes (see readable_splits); skipped files are kept."""
        checked, self.skipped_images = readable_splits(
            splits, self._decode_size, self.settings.skip_bad_images
        )
        return checked

    def train_dataloader(self) -> PositionedLoader | SemiLoader:
        """Resumable mid-epoch: order and augmentation are functions of (seed, epoch, image), and
        a semi-supervised run's unlabeled views functions of (seed, step)."""
        labelled = self._loader("train", train=True)
        if self.semi is None:
            return labelled
        return SemiLoader(labelled, self._unlabeled_views(), self.semi.start_epoch)

    def _unlabeled_views(self) -> DeviceViews | LoadedViews:
        """Both views of each step's unlabeled images: on the device path where the pool is in
        memory, else per image in loader workers."""
        semi, pool = self._require(self.semi), self._require(self.unlabeled_set)
        preprocessing = self._require(self.preprocessing)
        positions = StreamPositions(len(pool), self.seed, semi.mu * self.batch_size)
        if self.loader == "device" and pool.in_memory:
            device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
            weak = BatchAugment(semi.weak, preprocessing, train=True)
            strong = BatchAugment(semi.strong, preprocessing, train=True)
            return DeviceViews(pool, positions, weak, strong, device)
        views = BothViews(
            build_train_transform(semi.weak, preprocessing),
            build_train_transform(semi.strong, preprocessing),
        )
        return LoadedViews(
            ImageDataset(pool, views, self._decode_size),
            positions,
            num_workers=self.settings.num_workers,
            pin_memory=self.settings.pin_memory,
        )

    def val_dataloader(self) -> PositionedLoader:
        return self._loader("val")

    def test_dataloader(self) -> PositionedLoader:
        return self._loader("test")

    def plain_loader(
        self, split: str, limit: int | None = None, labels: Sequence[int] | None = None
    ) -> PositionedLoader:
        """Every image of `split` ("train", "val" or "test") once, in order, through the
        deterministic evaluation transform: what a frozen backbone's features are cached from.
        With `labels`, only the images of those classes; with `limit`, a seeded random `limit`
        of them (all, where there are fewer), in order: a sample of every class, where the set
        is sorted by class."""
        return self._loader(split, limit=limit, labels=labels)

    def mix(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """A training batch through MixUp/CutMix: (images, labels, soft_targets) when the augment
        group mixes batches, else the batch as it is."""
        return self.mixer(*batch) if self.mixer is not None else batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Mix training batches on the device; validation, test and predict batches stay
        (images, labels)."""
        if self.trainer is not None and self.trainer.training:
            if isinstance(batch, SemiBatch):
                return batch._replace(labelled=self.mix(batch.labelled))
            return self.mix(batch)
        return batch

    def _build_transforms(self, path: str, preprocessing: Preprocessing) -> None:
        """The training and evaluation transforms of the chosen data path, and only those."""
        if path == "device":
            self.train_transform: Any = BatchAugment(self.augment, preprocessing, train=True)
            self.eval_transform: Any = BatchAugment(self.augment, preprocessing, train=False)
        elif path == "streaming":  # training batches on the device, the rest by index
            self.train_transform = BatchAugment(self.augment, preprocessing, train=True)
            self.eval_transform = preprocessing.transform()
        else:
            self.train_transform = build_train_transform(self.augment, preprocessing)
            self.eval_transform = preprocessing.transform()

    def _loader(
        self,
        split: str,
        train: bool = False,
        limit: int | None = None,
        labels: Sequence[int] | None = None,
    ) -> PositionedLoader:
        """Every loader of `split`, on either path: training ones shuffle (sharded across ranks)
        and augment; the others see every image once (or `limit` of them), in order, on every
        rank."""
        images = self._loading(split)
        batch_size = self.batch_size if train else self.eval_batch_size
        balanced = train and self.settings.sampler == "balanced"
        weights = balanced_weights(images.labels) if balanced else None
        if self.loader == "device":
            device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
            if images.images.device != torch.device(device):  # type: ignore[union-attr]
                # Moved once and kept: the loaders of a split (fit, feature cache, test) share it.
                images = ImageSet(
                    images.images.to(device), images.labels.to(device), images.classes, images.ids
                )
                if split in self.pixels:
                    self.pixels[split] = images
                else:
                    setattr(self, f"{split}_set", images)
            images = self._sample(images, limit, labels)
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
        if train and images.streamed:
            device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
            return StreamingLoader(
                images.images,
                images.labels,
                self.train_transform,
                seed=self.seed,
                batch_size=batch_size,
                num_workers=self.settings.num_workers,
                device=device,
            )
        images = self._sample(images, limit, labels)
        return ResumableLoader(
            ImageDataset(
                images, self.train_transform if train else self.eval_transform, self._decode_size
            ),
            seed=self.seed,
            shuffle=train,
            labels=images.labels,
            weights=weights,
            batch_size=batch_size,
            num_workers=self.settings.num_workers,
            pin_memory=self.settings.pin_memory,
            persistent_workers=self.settings.num_workers > 0,
        )

    def _sample(
        self, images: ImageSet, limit: int | None, labels: Sequence[int] | None
    ) -> ImageSet:
        if labels is not None:
            wanted = torch.tensor(list(labels), device=images.labels.device)
            images = images.subset(torch.isin(images.labels, wanted).nonzero().flatten())
        if limit is None or limit >= len(images):
            return images
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(len(images), generator=generator)[:limit].sort().values
        return images.subset(chosen.to(images.labels.device))

    @staticmethod
    def _require(value: T | None) -> T:
        """What setup() makes."""
        if value is None:
            raise RuntimeError("ImageDataModule.setup() has not run yet")
        return value
