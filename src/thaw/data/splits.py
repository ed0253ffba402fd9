"""Planning the splits: seeded, stratified index arithmetic on labels (validation/test splits,
class subsets, K-fold and few-shot limits). Pure functions of the labels and the settings, so
the same seed gives the same split on every process; no image is read. Multi-label sets (label
sets as multi-hot rows) are split by iterative stratification (Sechidis et al. 2011, the
iterative-stratification package), which keeps each label's share in every part."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from thaw.data.settings import SplitSettings
from thaw.data.sources.base import ImageSet, Splits
from thaw.errors import UserError


def plan_splits(splits: Splits, settings: SplitSettings) -> Splits:
    """The train/val/test sets a run uses, from the source's (already class-filtered) sets.

    Stratified, seeded `test_fraction` and `val_fraction` splits of train for the sets the
    source lacks (val_fraction 0 leaves validation empty); the `samples_per_class` limit on
    train only, so few-shot runs are still validated and tested on full sets. With `folds`
    (K-fold cross-validation) the training pool, the source's own validation set included, is
    first limited to `samples_per_class`, then fold `fold` of a stratified, seeded split into
    `folds` parts is the validation set and the others train; `val_fraction` is then unused.
    The test set stays fixed either way. `unlabeled_per_class` draws that many more images per
    class from the training pool, outside the training and validation sets, as the unlabeled
    pool."""
    train, val, test = splits.train, splits.val, splits.test
    check_class_sizes(train, settings, split_test=test is None, split_val=val is None)
    seed, limit = settings.split_seed, settings.samples_per_class
    if test is None:
        train, test = split_imageset(train, settings.test_fraction, seed)
    if settings.folds is not None:
        pool = train if val is None else join(train, val)
        limited = limit_per_class(pool, limit, seed) if limit is not None else pool
        train, val = fold_split(limited, settings.folds, settings.fold, seed)
    else:
        if val is None:
            train, val = split_imageset(train, settings.val_fraction, seed)
        pool = train
        if limit is not None:
            train = limit_per_class(train, limit, seed)
    unlabeled = None
    if settings.unlabeled_per_class is not None:
        unlabeled = left_out(pool, [train, val], settings.unlabeled_per_class, seed)
    return Splits(train, test=test, val=val, unlabeled=unlabeled)


def left_out(pool: ImageSet, taken: Sequence[ImageSet], per_class: int, seed: int) -> ImageSet:
    """Up to `per_class` images of every class of `pool` that none of `taken` holds, drawn at
    random (seeded). Images are told apart by id, which the DataModule makes unique across a
    source's sets (thaw.data.corrections.number_images)."""
    used = torch.cat([imageset.ids for imageset in taken])
    rest = pool.subset(torch.nonzero(~torch.isin(pool.ids, used)).flatten())
    return limit_per_class(rest, per_class, seed) if len(rest) else rest


def check_class_sizes(
    train: ImageSet, settings: SplitSettings, split_test: bool, split_val: bool
) -> None:
    """Every class needs one training image plus one for each split taken off train: say
    which class falls short, rather than fail inside the split arithmetic."""
    if split_test and settings.test_fraction == 0:
        raise UserError(
            "the data has no test split of its own (no test/ folder) and data.test_fraction "
            "is 0: give a test/ folder or a data.test_fraction in (0, 1)"
        )
    held = [f"test (data.test_fraction={settings.test_fraction:g})"] if split_test else []
    if split_val and settings.val_fraction > 0 and settings.folds is None:
        held.append(f"validation (data.val_fraction={settings.val_fraction:g})")
    needed = 1 + len(held)
    sizes = class_counts(train)
    short = [(name, n) for name, n in zip(train.classes, sizes, strict=True) if n < needed]
    if short:
        listed = ", ".join(f"{name!r} has {n}" for name, n in short)
        names = " and ".join(["training", *held])
        raise UserError(
            f"too few images per class: {listed}; each class needs at least {needed} "
            f"(one for each of {names}). Add images, or give val/ and test/ folders"
        )


def class_counts(imageset: ImageSet) -> list[int]:
    """How many images of each class (for multi-label sets: how many have each label)."""
    if imageset.multilabel:
        return imageset.labels.sum(dim=0).long().tolist()
    return torch.bincount(imageset.labels, minlength=len(imageset.classes)).tolist()


def stratified_split(
    labels: torch.Tensor,
    fraction: float,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out `round(n_c * fraction)` samples of every class c (at least 1 when fraction > 0).

    Returns (keep_idx, held_idx), each sorted, disjoint and together covering every index. Every
    class keeps at least one sample, so a class needs 2 or more when fraction > 0. `class_names`
    only names a class in that error. Multi-hot labels (N, classes) are split by iterative
    stratification: a `fraction` of the images, each label's share as even as the sets allow.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if labels.ndim == 2:
        return _multilabel_split(labels, fraction, seed)
    generator = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = round(len(idx) * fraction)
        if fraction > 0:
            if len(idx) < 2:
                name = f"{class_names[c]!r} (label {c})" if class_names else f"label {c}"
                raise UserError(
                    f"class {name} has {len(idx)} sample; splitting a fraction off needs 2 or more"
                )
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    empty = torch.empty(0, dtype=torch.long)
    return (
        torch.sort(torch.cat(keep)).values if keep else empty,
        torch.sort(torch.cat(held)).values if held else empty,
    )


def _multilabel_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    everything = torch.arange(len(labels))
    if fraction == 0 or len(labels) < 2:
        return everything, torch.empty(0, dtype=torch.long)
    splitter = _stratifiers().MultilabelStratifiedShuffleSplit(
        n_splits=1, test_size=fraction, random_state=seed
    )
    keep, held = next(splitter.split(np.zeros(len(labels)), labels.numpy()))
    return torch.from_numpy(np.sort(keep)).long(), torch.from_numpy(np.sort(held)).long()


def _stratifiers() -> ModuleType:
    """iterative-stratification's splitters, imported where multi-label data needs them."""
    try:
        from iterstrat import ml_stratifiers
    except ImportError as err:
        raise UserError(
            "splitting multi-label data needs the iterative-stratification package: "
            "pip install 'thaw-vision[multilabel]'"
        ) from err
    return ml_stratifiers


def split_imageset(imageset: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """`stratified_split` applied to an ImageSet: (kept, held out)."""
    keep, held = stratified_split(imageset.labels, fraction, seed, imageset.classes)
    return imageset.subset(keep), imageset.subset(held)


def select_classes(imageset: ImageSet, names: Sequence[str]) -> ImageSet:
    """Only the images of the classes `names`, relabelled 0..k-1 in the order of `names` (of a
    multi-label set: only those labels, and the images that have one of them)."""
    names = list(names)
    if not names:
        raise UserError("classes must name at least one class")
    unknown = [name for name in names if name not in imageset.classes]
    if unknown:
        raise UserError(f"unknown classes {unknown}; valid classes: {imageset.classes}")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise UserError(f"classes {duplicated} are listed more than once")
    if imageset.multilabel:
        columns = imageset.labels[:, [imageset.classes.index(name) for name in names]]
        idx = torch.nonzero(columns.any(dim=1)).flatten()
        subset = imageset.subset(idx)
        return ImageSet(subset.images, columns[idx], names, subset.ids)
    new_label = torch.full((len(imageset.classes),), -1, dtype=torch.long)
    for new, name in enumerate(names):
        new_label[imageset.classes.index(name)] = new
    mapped = new_label[imageset.labels]
    idx = torch.nonzero(mapped >= 0).flatten()
    subset = imageset.subset(idx)
    return ImageSet(subset.images, mapped[idx], names, subset.ids)


def limit_per_class(imageset: ImageSet, n: int, seed: int) -> ImageSet:
    """At most `n` images of every class, drawn at random (seeded), in their original order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"samples per class must be a positive integer, got {n!r}")
    if imageset.multilabel:
        raise UserError(
            f"data.samples_per_class={n} (and data.unlabeled_per_class) limit single-label data: "
            "an image of a multi-label set has several classes. Give the CSV fewer rows instead"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(imageset.labels).tolist():
        idx = torch.nonzero(imageset.labels == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:n]])
    if not chosen:
        return imageset
    return imageset.subset(torch.sort(torch.cat(chosen)).values)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """`folds` disjoint index sets that cover every index, each holding an equal share (within
    one) of every class: the classes' shuffled indices, one after another, dealt round-robin.
    Seeded, so every process and every fold's run sees the same split. Multi-hot labels are
    dealt by iterative stratification, each label's images as evenly as the sets allow."""
    if labels.ndim == 2:
        splitter = _stratifiers().MultilabelStratifiedKFold(
            n_splits=folds, shuffle=True, random_state=seed
        )
        parts = splitter.split(np.zeros(len(labels)), labels.numpy())
        return [torch.from_numpy(np.sort(held)).long() for _, held in parts]
    generator = torch.Generator().manual_seed(seed)
    dealt = [
        idx[torch.randperm(len(idx), generator=generator)]
        for idx in (torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist())
    ]
    order = torch.cat(dealt) if dealt else torch.empty(0, dtype=torch.long)
    fold_of = torch.arange(len(order)) % folds
    return [torch.sort(order[fold_of == k]).values for k in range(folds)]


def fold_split(imageset: ImageSet, folds: int, fold: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """K-fold cross-validation: (the other folds, fold `fold`) of `stratified_folds`. Every
    class needs `folds` images or more, so that every fold validates every class."""
    sizes = class_counts(imageset)
    short = [
        f"{name!r} has {n}" for name, n in zip(imageset.classes, sizes, strict=True) if n < folds
    ]
    if short:
        raise UserError(
            f"data.folds={folds} needs {folds} or more training images per class, but "
            f"{', '.join(short)}. Lower data.folds or add images"
        )
    parts = stratified_folds(imageset.labels, folds, seed)
    held = parts[fold]
    keep = torch.sort(torch.cat([p for k, p in enumerate(parts) if k != fold])).values
    return imageset.subset(keep), imageset.subset(held)


def join(first: ImageSet, second: ImageSet) -> ImageSet:
    """Two image sets of the same classes as one (a source's own validation set joins the
    training pool that K-fold splits)."""
    if first.classes != second.classes:
        raise ValueError(f"cannot join sets of classes {first.classes} and {second.classes}")
    if first.in_memory and second.in_memory:
        images: torch.Tensor | list = torch.cat([first.images, second.images])
    else:
        images = [*first.images, *second.images]
    labels, ids = torch.cat([first.labels, second.labels]), torch.cat([first.ids, second.ids])
    return ImageSet(images, labels, first.classes, ids)
