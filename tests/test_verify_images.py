"""Every image file is checked to decode at setup, before the first step: a bad file in any split
(the test split included) stops the run naming it; the check runs in parallel with the same
answer, is cached for unchanged files only, and symlinked folders are followed without looping.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from data_formats import MEAN, STD, write_image_folder, write_truncated_jpeg
from datamodules import make_datamodule
from thaw.cli import describe, is_user_error
from thaw.data.dataset import ImageDataset
from thaw.data.images import ImageDecodeError
from thaw.data.sources.imagefolder import ImageFolder
from thaw.data.verify import verify_files


def folder_with_bad_test_image(root: Path) -> Path:
    write_image_folder(root, ["a", "b"], n_per_class=3, splits=("train", "test"))
    return write_truncated_jpeg(root / "test" / "b" / "cut.jpg")


def test_a_bad_test_image_stops_setup_naming_file_and_split(tmp_path: Path) -> None:
    bad = folder_with_bad_test_image(tmp_path)
    dm = make_datamodule(ImageFolder(tmp_path), None, MEAN, STD, image_size=16, val_fraction=0)
    with pytest.raises(ImageDecodeError) as err:
        dm.setup()
    assert f"could not decode image {bad} (test split)" in str(err.value)
    assert is_user_error(err.value)


def test_the_check_is_cached_for_unchanged_files_only(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a"], n_per_class=5, splits=("",))
    files = sorted(tmp_path.glob("a/*.png"))
    bad = write_truncated_jpeg(tmp_path / "a" / "cut.jpg")
    cache = tmp_path / "cache.sqlite"

    first = verify_files([*files, bad], None, workers=1, cache=cache)
    assert list(first.bad) == [bad] and first.decoded == 6
    again = verify_files([*files, bad], None, workers=1, cache=cache)
    assert list(again.bad) == [bad] and again.decoded == 1  # bad files are checked every time

    # A good file broken in place (new size and time) is decoded again, and found bad.
    files[2].write_bytes(files[2].read_bytes()[:40])
    changed = verify_files(files, None, workers=1, cache=cache)
    assert list(changed.bad) == [files[2]] and changed.decoded == 1


def test_an_unusable_cache_is_named_and_checking_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image_folder(tmp_path, ["a"], n_per_class=2, splits=("",))
    files = sorted(tmp_path.glob("a/*.png"))
    (tmp_path / "not_a_db").write_text("this is not sqlite")
    with caplog.at_level("WARNING"):
        found = verify_files(files, None, workers=1, cache=tmp_path / "not_a_db")
    assert found.bad == {} and found.decoded == 2
    assert "Cannot use the cache of decoded images" in caplog.text and "not_a_db" in caplog.text


def test_parallel_and_serial_checks_agree(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=80, splits=("",), size=(8, 8))
    bad = [write_truncated_jpeg(tmp_path / "a" / "cut.jpg"), tmp_path / "b" / "page.png"]
    bad[1].write_text("<html>not found</html>")
    files = sorted(tmp_path.glob("*/*"))
    serial = verify_files(files, None, workers=1, cache=tmp_path / "serial.sqlite")
    parallel = verify_files(files, None, workers=2, cache=tmp_path / "parallel.sqlite")
    assert serial == parallel and sorted(parallel.bad) == sorted(bad)
    assert parallel.decoded == len(files) == 162


def test_symlinked_folders_are_followed_loops_and_broken_links_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = write_image_folder(tmp_path / "elsewhere", ["x"], n_per_class=2, splits=("",))
    root = write_image_folder(tmp_path / "data", ["a", "b"], n_per_class=1, splits=("",))
    os.symlink(elsewhere / "x", root / "a" / "linked")  # a subfolder linked in
    os.symlink(root / "a", root / "a" / "up")  # a loop back up
    os.symlink(tmp_path / "gone.png", root / "b" / "gone.png")  # a broken link
    os.symlink(elsewhere / "x", root / "c")  # a whole class folder linked in

    with caplog.at_level("WARNING"):
        train = ImageFolder(root).load().train
    names = [path.relative_to(root).as_posix() for path in train.images]
    assert names == [
        "a/img_0.png",
        "a/linked/img_0.png",
        "a/linked/img_1.png",
        "b/img_0.png",
        "c/img_0.png",
        "c/img_1.png",
    ]
    assert train.classes == ["a", "b", "c"]
    assert f"Skipped {root / 'a' / 'up'}: it links to a folder already read" in (caplog.text)
    assert f"Skipped {root / 'b' / 'gone.png'}: a link to a file that does not exist" in (
        caplog.text
    )


def test_a_file_broken_after_setup_fails_in_a_worker_with_its_own_words(
    tmp_path: Path,
) -> None:
    root = write_image_folder(tmp_path, ["a", "b"], n_per_class=2, splits=("",))
    dm = make_datamodule(ImageFolder(root), None, MEAN, STD, image_size=16, val_fraction=0)
    dm.setup()
    victim = dm.train_set.images[0]
    shutil.copy(write_truncated_jpeg(tmp_path / "cut.jpg"), victim)
    dataset = ImageDataset(dm.train_set, dm.eval_transform)
    with pytest.raises(Exception) as err:
        list(DataLoader(dataset, batch_size=2, num_workers=1))
    assert is_user_error(err.value)
    assert describe(err.value).startswith(f"could not decode image {victim}")
