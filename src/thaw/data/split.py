"""Seeded, stratified index arithmetic on labels: validation/test splits, class subsets and
few-shot limits. Pure functions, so the same seed gives the same split on every process."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from thaw.data.sources.base import ImageSet


def stratified_split(
    labels: torch.Tensor,
    fraction: float,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out `round(n_c * fraction)` samples of every class c (at least 1 when fraction > 0).

    Returns (keep_idx, held_idx), each sorted, disjoint and together covering every index. Every
    class keeps at least one sample, so a class needs 2 or more when fraction > 0. `class_names`
    only names a class in that error.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = round(len(idx) * fraction)
        if fraction > 0:
            if len(idx) < 2:
                name = f"{class_names[c]!r} (label {c})" if class_names else f"label {c}"
                raise ValueError(
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


def split_imageset(imageset: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """`stratified_split` applied to an ImageSet: (kept, held out)."""
    keep, held = stratified_split(imageset.labels, fraction, seed, imageset.classes)
    return imageset.subset(keep), imageset.subset(held)


def select_classes(imageset: ImageSet, names: Sequence[str]) -> ImageSet:
    """Only the images of the classes `names`, relabelled 0..k-1 in the order of `names`."""
    names = list(names)
    if not names:
        raise ValueError("classes must name at least one class")
    unknown = [name for name in names if name not in imageset.classes]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; valid classes: {imageset.classes}")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"classes {duplicated} are listed more than once")
    new_label = torch.full((len(imageset.classes),), -1, dtype=torch.long)
    for new, name in enumerate(names):
        new_label[imageset.classes.index(name)] = new
    mapped = new_label[imageset.labels]
    idx = torch.nonzero(mapped >= 0).flatten()
    subset = imageset.subset(idx)
    return ImageSet(subset.images, mapped[idx], names)


def limit_per_class(imageset: ImageSet, n: int, seed: int) -> ImageSet:
    """At most `n` images of every class, drawn at random (seeded), in their original order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"samples per class must be a positive integer, got {n!r}")
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
    Seeded, so every process and every fold's run sees the same split."""
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
    sizes = torch.bincount(imageset.labels, minlength=len(imageset.classes)).tolist()
    short = [
        f"{name!r} has {n}" for name, n in zip(imageset.classes, sizes, strict=True) if n < folds
    ]
    if short:
        raise ValueError(
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
    return ImageSet(images, torch.cat([first.labels, second.labels]), first.classes)
