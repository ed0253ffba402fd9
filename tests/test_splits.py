"""The split plan, a pure function of labels and settings, and its helpers (stratified splits,
class selection, per-class limits, stratified folds), and the DataModule's k-fold
cross-validation on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_formats import MEAN, STD, counts, write_image_folder
from datamodules import make_datamodule
from thaw.data import ImageSet
from thaw.data.corrections import number_images
from thaw.data.datamodule import ImageDataModule
from thaw.data.settings import SplitSettings
from thaw.data.sources import fashion_mnist as fmnist
from thaw.data.sources.base import Splits
from thaw.data.sources.imagefolder import ImageFolder
from thaw.data.splits import (
    fold_split,
    limit_per_class,
    plan_splits,
    select_classes,
    stratified_folds,
    stratified_split,
)
from thaw.errors import UserError


def test_stratified_split_holds_each_class_fraction() -> None:
    sizes = {0: 10, 1: 7, 2: 3, 3: 50}
    labels = torch.cat([torch.full((n,), c) for c, n in sizes.items()])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]

    keep, held = stratified_split(labels, 0.2, seed=0)

    assert torch.equal(torch.sort(torch.cat([keep, held])).values, torch.arange(len(labels)))
    held_counts = counts(labels[held])
    for c, n in sizes.items():
        assert held_counts[c] == max(1, round(n * 0.2)) and abs(held_counts[c] - n * 0.2) <= 0.6
    assert torch.equal(stratified_split(labels, 0.2, seed=0)[1], held)
    assert not torch.equal(stratified_split(labels, 0.2, seed=1)[1], held)
    keep_all, none = stratified_split(labels, 0.0, seed=0)
    assert len(keep_all) == len(labels) and len(none) == 0


def test_stratified_split_needs_two_samples_per_class() -> None:
    with pytest.raises(ValueError, match="'lonely'"):
        stratified_split(torch.tensor([0, 0, 1]), 0.5, seed=0, class_names=["many", "lonely"])


def test_select_classes_and_limit_per_class() -> None:
    labels = torch.tensor([0, 1, 2, 3] * 6)
    images = torch.arange(len(labels), dtype=torch.uint8).reshape(-1, 1, 1, 1)
    imageset = ImageSet(images, labels, ["a", "b", "c", "d"])

    picked = select_classes(imageset, ["d", "b"])

    assert picked.classes == ["d", "b"] and counts(picked.labels) == {0: 6, 1: 6}
    assert torch.equal(imageset.labels[picked.images.flatten().long()], torch.tensor([1, 3] * 6))
    assert torch.equal(picked.labels, torch.tensor([1, 0] * 6))
    with pytest.raises(ValueError, match=r"\['a', 'b', 'c', 'd'\]"):
        select_classes(imageset, ["b", "zebra"])

    limited = limit_per_class(imageset, 4, seed=0)
    assert counts(limited.labels) == {c: 4 for c in range(4)}
    assert torch.equal(limit_per_class(imageset, 4, seed=0).images, limited.images)
    assert not torch.equal(limit_per_class(imageset, 4, seed=1).images, limited.images)
    assert len(limit_per_class(imageset, 100, seed=0)) == len(imageset)


def test_stratified_folds_are_disjoint_stratified_seeded_and_cover_the_pool() -> None:
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 13)[torch.randperm(30)]
    folds = stratified_folds(labels, 5, seed=3)
    joined = torch.cat(folds)
    assert sorted(joined.tolist()) == list(range(30))  # disjoint, and every index once
    for fold in folds:
        for c, n in ((0, 10), (1, 7), (2, 13)):
            assert n // 5 <= int((labels[fold] == c).sum()) <= -(-n // 5)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert all(
        torch.equal(a, b) for a, b in zip(folds, stratified_folds(labels, 5, seed=3), strict=True)
    )
    assert not all(
        torch.equal(a, b) for a, b in zip(folds, stratified_folds(labels, 5, seed=4), strict=True)
    )


@pytest.mark.parametrize("source", ["in memory", "image folder with val/"])
def test_kfold_validates_on_each_fold_of_the_pool_and_keeps_the_test_set(
    tmp_path: Path, fmnist_root: Path, source: str
) -> None:
    if source == "in memory":
        make = lambda: fmnist.FashionMNIST(fmnist_root, download=False)  # noqa: E731
        pool_size, options = 10 * 5, {"samples_per_class": 5}  # 8 a class, limited to 5
    else:
        write_image_folder(tmp_path, ["a", "b"], n_per_class=4, splits=("train",))
        write_image_folder(tmp_path, ["a", "b"], n_per_class=2, splits=("val", "test"), seed=1)
        make, pool_size, options = lambda: ImageFolder(tmp_path), 2 * 6, {}  # noqa: E731

    def split(fold: int) -> ImageDataModule:
        dm = make_datamodule(make(), None, MEAN, STD, image_size=8, folds=3, fold=fold, **options)
        dm.setup()
        return dm

    def keys(imageset: ImageSet) -> list:
        if imageset.in_memory:
            return [bytes(image.numpy()) for image in imageset.images]
        return list(imageset.images)

    runs = [split(k) for k in range(3)]
    held = [keys(dm.val_set) for dm in runs]
    assert sum(map(len, held)) == pool_size and len(set().union(*held)) == pool_size
    for dm, val in zip(runs, held, strict=True):
        assert set(keys(dm.train_set)).isdisjoint(val)
        assert len(dm.train_set) + len(val) == pool_size
        assert set(counts(dm.val_set.labels)) == set(range(len(dm.classes)))  # stratified
        assert keys(dm.test_set) == keys(runs[0].test_set)  # the test set stays fixed


def test_kfold_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"data.fold=1 needs data.folds"):
        make_datamodule(None, None, MEAN, STD, fold=1)
    with pytest.raises(ValueError, match=r"data.fold=0,1,2,3,4"):
        make_datamodule(None, None, MEAN, STD, folds=5)
    with pytest.raises(ValueError, match=r"\[0, 2\], got 3"):
        make_datamodule(None, None, MEAN, STD, folds=3, fold=3)
    labels = torch.tensor([0, 0, 0, 1, 1])
    small = ImageSet(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), labels, ["many", "few"])
    with pytest.raises(ValueError, match="data.folds=3 needs 3 or more .* 'few' has 2"):
        fold_split(small, 3, 0, seed=0)


def labelled(per_class: dict[int, int], classes: int | None = None) -> ImageSet:
    """An in-memory set whose one-pixel image i holds i, so a planned set shows which images
    it took; no image is ever read by the planner."""
    labels = torch.cat([torch.full((n,), c) for c, n in per_class.items()])
    images = torch.arange(len(labels), dtype=torch.int64).view(-1, 1, 1, 1)
    names = [f"class{c}" for c in range(classes or len(per_class))]
    return ImageSet(images, labels, names)


def ids(imageset: ImageSet) -> set[int]:
    return set(imageset.images.flatten().tolist())


def plan(splits: Splits, **values) -> Splits:
    settings = {
        "classes": None,
        "val_fraction": 0.25,
        "test_fraction": 0.2,
        "samples_per_class": None,
        "unlabeled_per_class": None,
        "folds": None,
        "fold": None,
        "split_seed": 0,
        **values,
    }
    return plan_splits(splits, SplitSettings(**settings))


def test_the_plan_takes_test_then_val_off_train_and_limits_only_train() -> None:
    pool = labelled({0: 20, 1: 20, 2: 10})
    planned = plan(Splits(pool), samples_per_class=5)
    assert counts(planned.test.labels) == {0: 4, 1: 4, 2: 2}  # 20% of each class
    assert counts(planned.val.labels) == {0: 4, 1: 4, 2: 2}  # 25% of what is left
    assert counts(planned.train.labels) == {0: 5, 1: 5, 2: 5}  # 5 of the 12, 12 and 6 left
    parts = [ids(planned.train), ids(planned.val), ids(planned.test)]
    assert sum(map(len, parts)) == len(set.union(*parts))  # disjoint
    again = plan(Splits(pool), samples_per_class=5)
    assert [ids(s) for s in (again.train, again.val, again.test)] == parts  # seeded
    other = plan(Splits(pool), samples_per_class=5, split_seed=1)
    assert ids(other.test) != parts[2]


def test_the_plan_keeps_a_source_test_set_and_folds_the_pool_with_its_val() -> None:
    train, val, test = labelled({0: 9, 1: 9}), labelled({0: 3, 1: 3}), labelled({0: 2, 1: 2})
    val = ImageSet(val.images + 100, val.labels, val.classes)
    planned = plan(Splits(train, test=test, val=val), folds=4, fold=1)
    assert planned.test is test  # fixed: never split, never limited
    assert counts(planned.val.labels) == {0: 3, 1: 3}  # a quarter of 12 per class
    assert ids(planned.train) | ids(planned.val) == ids(train) | ids(val)
    folds = [ids(plan(Splits(train, test=test, val=val), folds=4, fold=k).val) for k in range(4)]
    assert set().union(*folds) == ids(train) | ids(val) and sum(map(len, folds)) == 24


def test_unlabeled_images_are_training_images_no_split_holds() -> None:
    """unlabeled_per_class draws from what samples_per_class left of the training pool: never a
    training, validation or test image, with or without folds."""
    numbered = number_images(labelled({0: 20, 1: 20}), None, None)
    for folds in ({}, {"folds": 3, "fold": 1}):
        planned = plan(
            Splits(numbered["train"]), samples_per_class=4, unlabeled_per_class=5, **folds
        )
        assert counts(planned.unlabeled.labels) == {0: 5, 1: 5}
        held = [ids(planned.train), ids(planned.val), ids(planned.test)]
        assert ids(planned.unlabeled).isdisjoint(set.union(*held))
    few = plan(Splits(numbered["train"]), samples_per_class=4, unlabeled_per_class=100)
    assert counts(few.unlabeled.labels) == {0: 8, 1: 8}  # all that is left: 20 - 4 test - 4 val - 4
    with pytest.raises(
        UserError, match="unlabeled_per_class=5 takes its images from .*samples_per_class"
    ):
        plan(Splits(numbered["train"]), unlabeled_per_class=5)


def test_the_plan_names_the_class_too_small_to_split() -> None:
    with pytest.raises(UserError, match=r"'class1' has 2; each class needs at least 3"):
        plan(Splits(labelled({0: 10, 1: 2})))
