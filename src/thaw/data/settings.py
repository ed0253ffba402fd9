"""The data group's settings as one checked value: what the DataModule and the split planner take.

`conf/data_base.yaml` (and each data option) is the one source of their defaults: the fields
have none, so no Python default can disagree with the YAML. Each value is checked once, here,
naming its key, the value and what it must be.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thaw import checks
from thaw.data.corrections import Corrections
from thaw.data.loader_choice import LOADERS
from thaw.data.sources.base import Source
from thaw.data.stats import NORMALIZE
from thaw.errors import UserError

# data.sampler: `random` visits every training image once an epoch; `balanced` draws as many
# images with replacement, every class equally often (a catalogue with 10x more of one class).
SAMPLERS = ("random", "balanced")


@dataclass(frozen=True)
class SplitSettings:
    """How a source's images become train/val/test: see thaw.data.splits.plan_splits."""

    classes: Sequence[str] | None
    val_fraction: float
    test_fraction: float
    samples_per_class: int | None
    unlabeled_per_class: int | None
    folds: int | None
    fold: int | None
    split_seed: int

    def __post_init__(self) -> None:
        if isinstance(self.classes, str):
            raise UserError(
                f"data.classes must be a list of class names or null, got {self.classes!r}"
            )
        if self.classes is not None:
            object.__setattr__(self, "classes", [str(name) for name in self.classes])
        checks.fraction("data.val_fraction", self.val_fraction)
        checks.fraction("data.test_fraction", self.test_fraction)
        checks.integer("data.samples_per_class", self.samples_per_class, 1, nullable=True)
        checks.integer("data.unlabeled_per_class", self.unlabeled_per_class, 1, nullable=True)
        if self.unlabeled_per_class is not None and self.samples_per_class is None:
            raise UserError(
                f"data.unlabeled_per_class={self.unlabeled_per_class} takes its images from the "
                "training images that data.samples_per_class leaves out: set that too "
                "(e.g. data.samples_per_class=100)"
            )
        checks.integer("data.split_seed", self.split_seed)
        _check_folds(self.folds, self.fold)


@dataclass(frozen=True)
class DataSettings:
    """The data group (conf/data/*.yaml), instantiated: the source, how it is split, and how it
    is loaded. `root` is the user-facing `data.root`, which the config interpolates into the
    source; `seed` (training order and augmentation) None draws one."""

    source: Source
    root: str | None
    image_size: int | None
    normalize: str
    splits: SplitSettings
    skip_bad_images: bool
    batch_size: int
    eval_batch_size: int | None
    num_workers: int
    seed: int | None
    pin_memory: bool
    sampler: str
    loader: str
    exclude: str | None
    relabel: str | None
    unlabeled_root: str | None
    unlabeled: str | None
    cache: str | bool | None
    cache_dir: str

    def __post_init__(self) -> None:
        checks.integer("data.image_size", self.image_size, 1, nullable=True)
        checks.choice("data.normalize", self.normalize, NORMALIZE)
        checks.flag("data.skip_bad_images", self.skip_bad_images)
        checks.integer("data.batch_size", self.batch_size, 1)
        checks.integer("data.eval_batch_size", self.eval_batch_size, 1, nullable=True)
        checks.integer("data.num_workers", self.num_workers, 0)
        checks.integer("data.seed", self.seed, nullable=True)
        checks.flag("data.pin_memory", self.pin_memory)
        checks.choice("data.sampler", self.sampler, SAMPLERS)
        checks.choice("data.loader", self.loader, LOADERS)
        folder = isinstance(self.cache, str) and self.cache.strip() != ""
        if not (self.cache is None or isinstance(self.cache, bool) or folder):
            raise UserError(
                f"data.cache must be a folder, true (the folder data.cache_dir) or null, "
                f"got {self.cache!r}"
            )
        _ = self.corrections  # read now: a wrong file or column is said before any image is

    @functools.cached_property
    def corrections(self) -> Corrections:
        """The review lists of data.exclude and data.relabel (see thaw.data.corrections)."""
        return Corrections.read(self.exclude, self.relabel, self.root)

    @property
    def cache_folder(self) -> Path | None:
        """Where the decoded cache (thaw.data.cache) lives; None: image files are decoded every
        epoch."""
        if self.cache is None or self.cache is False:
            return None
        return Path(self.cache_dir if self.cache is True else self.cache).expanduser()

    @classmethod
    def of(cls, source: Source, **values: Any) -> DataSettings:
        """The settings from the data group's flat keys (the `_target_` of conf/data_base.yaml):
        the split keys are gathered into `splits`. Keys a source declares as its own
        (`DATA_KEYS`, such as data.csv) reached it through the config and are dropped here."""
        for name in getattr(source, "DATA_KEYS", ()):
            values.pop(name, None)
        split_keys = [name for name in SplitSettings.__dataclass_fields__ if name in values]
        known = [name for name in cls.__dataclass_fields__ if name not in ("source", "splits")]
        unknown = sorted(set(values) - set(known) - set(split_keys))
        if unknown:
            listed = ", ".join(f"data.{name}" for name in unknown)
            every = ", ".join(sorted([*known, *SplitSettings.__dataclass_fields__]))
            raise UserError(f"{listed}: not a data setting; the data settings are {every}")
        splits = SplitSettings(**{name: values.pop(name) for name in split_keys})
        return cls(source=source, splits=splits, **values)


def _check_folds(folds: Any, fold: Any) -> None:
    """K-fold needs both values, or neither: data.folds=5 data.fold=2."""
    if folds is None:
        if fold is not None:
            raise UserError(f"data.fold={fold!r} needs data.folds (e.g. data.folds=5)")
        return
    checks.integer("data.folds", folds, 2)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise UserError(
            f"data.folds={folds} needs data.fold, the fold to validate on: an integer in "
            f"[0, {folds - 1}], got {fold!r}. Run all folds with -m data.fold="
            + ",".join(str(k) for k in range(folds))
        )
