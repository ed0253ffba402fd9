"""The Tiny ImageNet source: the published layout downloaded, checked, extracted and read, its
decoded cache reused and rebuilt, and every broken folder, cache or archive named in the error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_formats import (
    WNIDS,
    WORDS,
    closed_port_url,
    counts,
    loopback_fixture,  # noqa: F401 (the `loopback` fixture)
    serve_directory,
    tiny_imagenet_archive,
    write_tiny_imagenet,
)
from thaw.data import DataUnavailableError
from thaw.data.sources import tiny_imagenet
from thaw.data.sources.download import ChecksumError
from thaw.data.sources.tiny_imagenet import TinyImageNet
from thaw.errors import UserError

TINY_CLASSES = ["goldfish", "Chihuahua", "cougar (n02125311)", "cougar (n03000000)"]


def tiny_archive(directory: Path) -> tuple[Path, str]:
    """4 classes, 3 train and 2 val images each; goldfish's are grayscale JPEGs."""
    return tiny_imagenet_archive(
        directory, words=WORDS, wnids=WNIDS, n_train=3, n_val=2, gray=["n01443537"]
    )


def class_of(images: torch.Tensor) -> list[int]:
    """The class each flat-coloured test image was drawn for (red = 40 * class + 20)."""
    return [round((int(red) - 20) / 40) for red in images[:, 0, 32, 32]]


def test_tiny_imagenet_downloads_checks_extracts_and_reads_the_real_layout(
    tmp_path: Path, loopback: None
) -> None:
    archive, md5 = tiny_archive(tmp_path / "server")
    root = tmp_path / "data"
    with serve_directory(archive.parent) as base_url:
        source = TinyImageNet(root, url=base_url + archive.name, md5=md5)
        source.prepare()
        splits = source.load()

    train, test = splits.train, splits.test
    assert train.classes == TINY_CLASSES and test.classes == TINY_CLASSES
    assert train.images.shape == (12, 3, 64, 64) and train.images.dtype == torch.uint8
    assert test.images.shape == (8, 3, 64, 64) and splits.val is None
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert class_of(train.images) == train.labels.tolist()
    # val images lie in one folder in shuffled order: their labels come from the annotations
    assert class_of(test.images) == test.labels.tolist()
    assert counts(test.labels) == dict.fromkeys(range(4), 2)
    goldfish = train.images[train.labels == 0].int()
    assert (goldfish[:, 0] == goldfish[:, 1]).all() and (goldfish[:, 1] == goldfish[:, 2]).all()
    assert not torch.equal(train.images[3, 0], train.images[3, 1])  # a colour one stays colour
    folder, cache, zipped = sorted(p.name for p in root.iterdir())
    assert folder == "tiny-imagenet-200" and zipped == archive.name
    assert cache.startswith("tiny-imagenet-200.cache-") and cache.endswith(".npz")


def test_tiny_imagenet_wrong_md5_leaves_nothing_behind(tmp_path: Path, loopback: None) -> None:
    archive, md5 = tiny_archive(tmp_path / "server")
    root = tmp_path / "data"
    with serve_directory(archive.parent) as base_url:
        with pytest.raises(ChecksumError) as err:
            TinyImageNet(root, url=base_url + archive.name, md5="0" * 32).load()
    assert archive.name in str(err.value) and md5 in str(err.value)
    assert list(root.iterdir()) == []


def test_tiny_imagenet_absent_without_download_says_what_to_place_where(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match="download is off") as err:
        TinyImageNet(tmp_path, download=False).load()
    message = str(err.value)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in message
    assert str(tmp_path) in message and "tiny-imagenet-200.zip" in message


def test_tiny_imagenet_cache_is_reused_and_rebuilt_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_imagenet(tmp_path, words=WORDS, wnids=WNIDS, n_train=2, n_val=1)
    TinyImageNet(tmp_path, download=False).prepare()  # the DataModule's prepare_data decodes
    (cache,) = tmp_path.glob("tiny-imagenet-200.cache-*.npz")

    decoded: list[Path] = []
    real_load_image = tiny_imagenet.load_image

    def counting(path: Path, min_size: int | None = None) -> Image.Image:
        decoded.append(path)
        return real_load_image(path, min_size)

    monkeypatch.setattr(tiny_imagenet, "load_image", counting)
    second = TinyImageNet(tmp_path, download=False).load()
    assert decoded == []
    assert second.train.images.shape == (8, 3, 64, 64) and second.train.classes == TINY_CLASSES
    assert class_of(second.test.images) == second.test.labels.tolist()

    changed = tmp_path / "tiny-imagenet-200" / "train" / "n02085620" / "images" / "n02085620_1.JPEG"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(changed, "JPEG")
    third = TinyImageNet(tmp_path, download=False).load()
    assert len(decoded) == 8 + 4
    assert int(third.train.images[3].min()) >= 250  # the second Chihuahua, now white
    (rebuilt,) = tmp_path.glob("tiny-imagenet-200.cache-*.npz")
    assert rebuilt != cache  # and the stale cache is gone


def _write_small_jpeg(folder: Path) -> None:
    Image.new("RGB", (32, 32)).save(
        folder / "train" / "n02085620" / "images" / "n02085620_0.JPEG", "JPEG"
    )


def _write_junk_jpeg(folder: Path) -> None:
    (folder / "train" / "n02085620" / "images" / "n02085620_0.JPEG").write_bytes(b"\xff\xd8junk")


INCOMPLETE = "is not a complete Tiny ImageNet folder. Delete it, and the next run extracts"
# An extracted folder broken one way: how, the error, the file it names (relative to
# tiny-imagenet-200/) and what else the message must say (the expectation or the fix).
BROKEN_TINY_FOLDERS = {
    "no_wnids": (
        lambda f: (f / "wnids.txt").unlink(),
        UserError,
        "wnids.txt",
        [INCOMPLETE],
    ),
    "empty_wnids": (
        lambda f: (f / "wnids.txt").write_text("\n"),
        ValueError,
        "wnids.txt",
        ["lists no class ids"],
    ),
    "no_words": (
        lambda f: (f / "words.txt").unlink(),
        UserError,
        "words.txt",
        [INCOMPLETE],
    ),
    "words_line_without_tab": (
        lambda f: (f / "words.txt").write_text("n01443537 goldfish\n"),
        ValueError,
        "words.txt:1",
        ["expected 'wnid<TAB>names'", "'n01443537 goldfish'"],
    ),
    "class_folder_missing": (
        lambda f: shutil.rmtree(f / "train" / "n02085620"),
        UserError,
        "train/n02085620/images",
        ["class n02085620 of wnids.txt", INCOMPLETE],
    ),
    "no_val_annotations": (
        lambda f: (f / "val" / "val_annotations.txt").unlink(),
        UserError,
        "val/val_annotations.txt",
        [INCOMPLETE],
    ),
    "annotation_of_an_unknown_class": (
        lambda f: (f / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999999\t0\n"),
        ValueError,
        "val/val_annotations.txt:1",
        ["expected 'file<TAB>wnid<TAB>box' with a wnid of wnids.txt", "n09999999"],
    ),
    "annotated_val_image_missing": (
        lambda f: (f / "val" / "images" / "val_0.JPEG").unlink(),
        UserError,
        "val/images/val_0.JPEG",
        ["val_annotations.txt:1", INCOMPLETE],
    ),
    "image_not_64px": (
        _write_small_jpeg,
        ValueError,
        "train/n02085620/images/n02085620_0.JPEG",
        ["is 32x32, expected 64x64"],
    ),
    "image_corrupt": (
        _write_junk_jpeg,
        OSError,  # thaw.data.images.ImageDecodeError
        "train/n02085620/images/n02085620_0.JPEG",
        ["could not decode image", "Replace or remove the file"],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_TINY_FOLDERS))
def test_tiny_imagenet_broken_folder_names_the_file(tmp_path: Path, case: str) -> None:
    """Every way an extracted folder can lack what the source reads fails on the file at fault,
    by its full path, before anything is cached."""
    breaks, error, names, says = BROKEN_TINY_FOLDERS[case]
    folder = write_tiny_imagenet(tmp_path, words=WORDS, wnids=WNIDS, n_train=1, n_val=1)
    breaks(folder)
    with pytest.raises(error) as err:
        TinyImageNet(tmp_path, download=False).load()
    message = str(err.value)
    assert str(folder / names) in message, message
    for text in says:
        assert text in message, message
    if not names.startswith("words.txt:"):  # its lines are read for the class names only
        assert list(tmp_path.glob("*.npz")) == []


def test_tiny_imagenet_unreadable_cache_names_it_and_deleting_it_rebuilds(tmp_path: Path) -> None:
    """A truncated cache (a full disk, a killed copy) is named with the fix, and the fix works."""
    write_tiny_imagenet(tmp_path, words=WORDS, wnids=WNIDS, n_train=1, n_val=1)
    TinyImageNet(tmp_path, download=False).prepare()
    (cache,) = tmp_path.glob("tiny-imagenet-200.cache-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(OSError, match="delete it to rebuild it") as err:
        TinyImageNet(tmp_path, download=False).load()
    assert f"cannot read the cache {cache}" in str(err.value)
    cache.unlink()
    assert len(TinyImageNet(tmp_path, download=False).load().train) == 4


def _truncate(archive: Path) -> None:
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])


def _corrupt_wnids_member(archive: Path) -> None:
    data = bytearray(archive.read_bytes())
    at = data.index("".join(f"{w}\n" for w in WNIDS).encode())  # stored, not compressed
    data[at] ^= 0xFF
    archive.write_bytes(bytes(data))


def _repack_without_top_folder(archive: Path) -> None:
    staging = archive.parent / "staging"
    write_tiny_imagenet(staging, words=WORDS, wnids=WNIDS, n_train=1, n_val=1)
    made = shutil.make_archive(str(staging / "flat"), "zip", staging / "tiny-imagenet-200")
    Path(made).replace(archive)
    shutil.rmtree(staging)


# How a hand-placed archive is broken, and what the error says about it.
BROKEN_TINY_ARCHIVES = {
    "truncated": (_truncate, "could not be extracted"),
    "bad_crc": (_corrupt_wnids_member, "could not be extracted: Bad CRC-32"),
    "no_top_level_folder": (
        _repack_without_top_folder,
        "has no top-level folder tiny-imagenet-200/",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_TINY_ARCHIVES))
def test_tiny_imagenet_unusable_archive_names_it_and_leaves_nothing_extracted(
    tmp_path: Path, case: str
) -> None:
    """An archive placed by hand (md5 check off, as for a mirror) that cannot give the dataset
    folder fails naming the archive, and no half-extracted folder is left to be taken for it."""
    breaks, says = BROKEN_TINY_ARCHIVES[case]
    root = tmp_path / "data"
    archive, _ = tiny_archive(root)
    breaks(archive)
    with pytest.raises(RuntimeError, match=says) as err:
        TinyImageNet(root, download=False, md5=None).load()
    assert str(archive) in str(err.value)
    assert [p.name for p in root.iterdir()] == [archive.name]


def test_tiny_imagenet_archive_placed_by_hand_is_checked_against_the_published_md5(
    tmp_path: Path,
) -> None:
    """A hand-placed archive that is not the published one is refused before extraction, naming
    the file and both sums."""
    archive, md5 = tiny_archive(tmp_path)
    with pytest.raises(ChecksumError) as err:
        TinyImageNet(tmp_path, download=False).load()
    message = str(err.value)
    assert str(archive) in message and md5 in message and TinyImageNet.MD5 in message
    assert not (tmp_path / "tiny-imagenet-200").exists()


def test_tiny_imagenet_unreachable_url_says_what_to_place_where(
    tmp_path: Path, loopback: None
) -> None:
    """A failed download (here a closed port) names the URL, the archive and where to put it."""
    url = closed_port_url() + "tiny-imagenet-200.zip"
    root = tmp_path / "data"
    with pytest.raises(DataUnavailableError, match="download it by other means") as err:
        TinyImageNet(root, url=url).load()
    message = str(err.value)
    assert url in message and str(root) in message and "tiny-imagenet-200.zip" in message
    assert not (root / "tiny-imagenet-200").exists()
