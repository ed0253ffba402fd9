"""The ImageFolder source: classes from folders, split folders used or a stratified split made,
what the errors say, and bad image files failing at setup by path or skipped, counted and
logged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_formats import (
    MEAN,
    STD,
    counts,
    write_exif_rotated_jpeg,
    write_image_folder,
    write_truncated_jpeg,
)
from datamodules import make_datamodule
from thaw.data import DataUnavailableError
from thaw.data.datamodule import ImageDataModule
from thaw.data.images import ImageDecodeError
from thaw.data.sources.imagefolder import ImageFolder


def test_imagefolder_classes_from_folders_and_non_images_ignored(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["dog", "cat", "ant"], n_per_class=3, splits=("",))
    write_image_folder(tmp_path, ["cat"], n_per_class=1, splits=("",), suffix=".JPG", seed=1)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"")
    (tmp_path / "README").write_text("top-level files are not classes")

    splits = ImageFolder(tmp_path).load()

    assert splits.train.classes == ["ant", "cat", "dog"]
    assert sorted(p.suffix for p in splits.train.images) == [".JPG"] + [".png"] * 9
    assert counts(splits.train.labels) == {0: 3, 1: 4, 2: 3}
    assert splits.val is None and splits.test is None and not splits.train.in_memory


def test_imagefolder_uses_split_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=4, splits=("train",))
    write_image_folder(tmp_path, ["a", "b"], n_per_class=2, splits=("val", "test"))
    splits = ImageFolder(tmp_path).load()
    assert [len(splits.train), len(splits.val), len(splits.test)] == [8, 4, 4]
    assert all(p.parts[-3] == "test" for p in splits.test.images)
    assert all(p.parts[-3] == "val" for p in splits.val.images)


def test_imagefolder_without_split_folders_is_split_stratified(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b", "c"], n_per_class=10, splits=("train",))

    def setup() -> ImageDataModule:
        dm = make_datamodule(
            ImageFolder(tmp_path),
            None,
            MEAN,
            STD,
            image_size=8,
            test_fraction=0.2,
            val_fraction=0.25,
        )
        dm.setup()
        return dm

    dm = setup()
    assert counts(dm.test_set.labels) == {0: 2, 1: 2, 2: 2}
    assert counts(dm.val_set.labels) == {0: 2, 1: 2, 2: 2}
    assert counts(dm.train_set.labels) == {0: 6, 1: 6, 2: 6}
    every = [*dm.train_set.images, *dm.val_set.images, *dm.test_set.images]
    assert len(set(every)) == 30
    assert setup().test_set.images == dm.test_set.images


def test_imagefolder_needs_a_test_split(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=4, splits=("train",))
    dm = make_datamodule(ImageFolder(tmp_path), None, MEAN, STD, test_fraction=0.0)
    with pytest.raises(ValueError, match="test_fraction is 0"):
        dm.setup()


def test_a_class_with_too_few_images_is_named_with_its_count(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["plenty", "rare"], n_per_class=5, splits=("",))
    for extra in sorted((tmp_path / "rare").iterdir())[2:]:
        extra.unlink()
    dm = make_datamodule(ImageFolder(tmp_path), None, MEAN, STD)
    with pytest.raises(ValueError, match="'rare' has 2") as err:
        dm.setup()
    message = str(err.value)
    assert "'plenty'" not in message and "at least 3" in message
    assert "data.test_fraction=0.1" in message and "data.val_fraction=0.1" in message
    with_folders = make_datamodule(
        ImageFolder(tmp_path), None, MEAN, STD, image_size=8, val_fraction=0.0
    )
    with_folders.setup()  # 2 are enough for train and test
    assert counts(with_folders.test_set.labels) == {0: 1, 1: 1}


def test_imagefolder_mismatched_class_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=1, splits=("train",))
    write_image_folder(tmp_path, ["a", "c"], n_per_class=1, splits=("val",))
    with pytest.raises(ValueError, match="differ") as err:
        ImageFolder(tmp_path).load()
    message = str(err.value)
    assert str(tmp_path / "val") in message and "'b'" in message and "'c'" in message


def test_imagefolder_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match=str(tmp_path / "absent")):
        ImageFolder(tmp_path / "absent").load()
    (tmp_path / "notes.txt").write_text("no class folders here")
    with pytest.raises(ValueError, match="no class folders") as err:
        ImageFolder(tmp_path).load()
    assert str(tmp_path) in str(err.value)


def photo_folder(root: Path) -> list[Path]:
    """Two classes of photos in every mode, plus a truncated and a fake JPEG; returns the bad."""
    write_image_folder(root, ["bag", "shoe"], n_per_class=4, splits=("",))
    Image.new("CMYK", (12, 10), (0, 50, 100, 0)).save(root / "bag" / "cmyk.jpg")
    Image.new("RGBA", (12, 10), (0, 0, 0, 0)).save(root / "bag" / "cutout.png")
    Image.fromarray(np.full((10, 12), 4000, dtype=np.uint16)).save(root / "shoe" / "deep.png")
    write_exif_rotated_jpeg(root / "shoe" / "phone.jpg")
    bad = [write_truncated_jpeg(root / "bag" / "cut.jpg"), root / "shoe" / "page.jpg"]
    bad[1].write_text("<html>not found</html>")
    return sorted(bad)


def test_a_bad_file_fails_at_setup_with_its_path_and_split(tmp_path: Path) -> None:
    bad = photo_folder(tmp_path)
    dm = make_datamodule(
        ImageFolder(tmp_path), None, MEAN, STD, image_size=16, val_fraction=0, batch_size=64
    )
    with pytest.raises(ImageDecodeError, match="do not decode \\(2, checked before") as err:
        dm.setup()
    for path in bad:
        assert f"could not decode image {path} (train split)" in str(err.value)
    assert "data.skip_bad_images=true" in str(err.value)


def test_bad_files_are_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = photo_folder(tmp_path)
    dm = make_datamodule(
        ImageFolder(tmp_path),
        None,
        MEAN,
        STD,
        image_size=16,
        test_fraction=0.2,
        skip_bad_images=True,
        batch_size=4,
    )
    with caplog.at_level("WARNING"):
        dm.setup()
    assert sorted(dm.skipped_images) == bad
    assert "Skipped 2 images" in caplog.text and all(str(p) in caplog.text for p in bad)
    sets = (dm.train_set, dm.val_set, dm.test_set)
    assert sum(len(s) for s in sets) == 12
    assert not set(bad) & {path for s in sets for path in s.images}
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for images, _ in loader:
            assert images.shape[1:] == (3, 16, 16) and torch.isfinite(images).all()
