"""Behaviour of the data layer: readers on the real formats, download/extract, splits, transforms,
the DataModule and the data configs."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from data_formats import (
    CIFAR10_CLASSES,
    cifar10_archive,
    closed_port_url,
    serve_directory,
    tiny_imagenet_archive,
    write_cifar10,
    write_cifar_batch,
    write_exif_rotated_jpeg,
    write_fashion_mnist,
    write_idx,
    write_image_folder,
    write_tiny_imagenet,
    write_truncated_jpeg,
)
from thaw.config import compose_config
from thaw.data import DataUnavailableError, ImageSet, Splits
from thaw.data.datamodule import ImageDataModule
from thaw.data.images import load_image
from thaw.data.sources import fashion_mnist as fmnist
from thaw.data.sources import tiny_imagenet
from thaw.data.sources.base import ArchiveSource
from thaw.data.sources.cifar10 import CIFAR10
from thaw.data.sources.download import ChecksumError
from thaw.data.sources.fashion_mnist import FashionMNIST
from thaw.data.sources.imagefolder import ImageFolder
from thaw.data.sources.tiny_imagenet import TinyImageNet
from thaw.data.split import (
    fold_split,
    limit_per_class,
    select_classes,
    stratified_folds,
    stratified_split,
)
from thaw.preprocess import Preprocessing

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.1]
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to 127.0.0.1 must not go through a proxy set in the environment."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def counts(labels: torch.Tensor) -> dict[int, int]:
    return dict(Counter(labels.tolist()))


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_reads_the_batches_exactly(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path, n_per_class=3)
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, 2 * 1024 + 5 * 32 + 7] = 255  # blue plane, row 5, column 7
    write_cifar_batch(folder / "data_batch_1", np.concatenate([row, row + 1]), [4, 9], "b1")

    splits = CIFAR10(tmp_path, download=False).load()

    batches = [folder / f"data_batch_{i}" for i in range(1, 6)]
    expected = [pickle.loads(path.read_bytes(), encoding="bytes") for path in batches]
    data = np.concatenate([batch[b"data"] for batch in expected])
    labels = sum((batch[b"labels"] for batch in expected), [])
    train = splits.train
    assert train.in_memory and train.images.dtype == torch.uint8
    assert train.images.shape == (len(data), 3, 32, 32)
    assert torch.equal(train.images.reshape(len(data), -1), torch.from_numpy(data))
    assert train.labels.tolist() == labels and train.labels.dtype == torch.long
    assert train.images[0, 2, 5, 7] == 255 and train.images[0].sum() == 255
    assert train.classes == CIFAR10_CLASSES
    test = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    assert torch.equal(splits.test.images.reshape(30, -1), torch.from_numpy(test[b"data"]))
    assert splits.test.labels.tolist() == test[b"labels"]
    assert splits.val is None


def test_cifar10_downloads_checks_and_extracts_the_archive(tmp_path: Path, loopback: None) -> None:
    archive, md5 = cifar10_archive(tmp_path / "server", n_per_class=2)
    root = tmp_path / "data"
    with serve_directory(archive.parent) as base_url:
        source = CIFAR10(root, url=base_url + archive.name, md5=md5)
        source.prepare()
        splits = source.load()
    assert len(splits.train) == 20 and len(splits.test) == 20
    assert counts(splits.train.labels) == {c: 2 for c in range(10)}
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", archive.name]


def test_cifar10_extracts_an_archive_placed_by_hand(tmp_path: Path) -> None:
    _, md5 = cifar10_archive(tmp_path, n_per_class=1)
    assert len(CIFAR10(tmp_path, download=False, md5=md5).load().train) == 10


def test_cifar10_wrong_md5_leaves_nothing_behind(tmp_path: Path, loopback: None) -> None:
    archive, md5 = cifar10_archive(tmp_path / "server", n_per_class=1)
    root = tmp_path / "data"
    wrong = "0" * 32
    with serve_directory(archive.parent) as base_url:
        with pytest.raises(ChecksumError) as err:
            CIFAR10(root, url=base_url + archive.name, md5=wrong).load()
    message = str(err.value)
    assert archive.name in message and wrong in message and md5 in message
    assert list(root.iterdir()) == []


def test_cifar10_unreachable_url_says_what_to_place_where(tmp_path: Path, loopback: None) -> None:
    url = closed_port_url() + "cifar-10-python.tar.gz"
    with pytest.raises(DataUnavailableError) as err:
        CIFAR10(tmp_path / "data", url=url).load()
    message = str(err.value)
    assert url in message and str(tmp_path / "data") in message
    assert "cifar-10-python.tar.gz" in message
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


def test_cifar10_absent_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match="download is off") as err:
        CIFAR10(tmp_path, download=False).prepare()
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(err.value)
    assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_fashion_mnist_reads_idx_files_exactly(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 7, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(tmp_path / f"{stem}{suffix}", array)

    splits = FashionMNIST(tmp_path, download=False, system_dir=None).load()

    train, test = splits.train, splits.test
    assert train.images.shape == (7, 1, 28, 28) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert np.array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert splits.val is None


def test_fashion_mnist_wrong_magic_names_the_file(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=4, n_test=2)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.zeros((4, 2, 2), dtype=np.uint8))  # an images header where labels belong
    with pytest.raises(ValueError, match="magic number") as err:
        FashionMNIST(tmp_path, download=False, system_dir=None).load()
    assert str(bad) in str(err.value)


def test_fashion_mnist_found_in_system_dir(tmp_path: Path) -> None:
    system_dir = write_fashion_mnist(tmp_path / "system", n_train=20, n_test=10)
    splits = FashionMNIST(tmp_path / "empty", download=False, system_dir=system_dir).load()
    assert len(splits.train) == 20 and len(splits.test) == 10
    assert not (tmp_path / "empty").exists()


def test_fashion_mnist_downloads_with_md5_check(
    tmp_path: Path, loopback: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = write_fashion_mnist(tmp_path / "server", n_train=10, n_test=5)
    for path in served.iterdir():
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        monkeypatch.setitem(fmnist.FILES, path.name.removesuffix(".gz"), md5)
    root = tmp_path / "data"
    with serve_directory(served) as base_url:
        splits = FashionMNIST(root, url=base_url, system_dir=None).load()
    assert len(splits.train) == 10 and len(splits.test) == 5
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in served.iterdir())


def test_fashion_mnist_unavailable_names_url_files_dir_and_package(
    tmp_path: Path, loopback: None
) -> None:
    url = closed_port_url()
    with pytest.raises(DataUnavailableError) as err:
        FashionMNIST(tmp_path / "data", url=url, system_dir=tmp_path / "nowhere").load()
    message = str(err.value)
    for part in (
        url,
        str(tmp_path / "data"),
        "train-images-idx3-ubyte.gz",
        "dataset-fashion-mnist",
    ):
        assert part in message


def test_fashion_mnist_real_debian_files(tmp_path: Path) -> None:
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    names += ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if not all((REAL_FASHION_MNIST / name).is_file() for name in names):
        pytest.fail(
            f"the real Fashion-MNIST files are not in {REAL_FASHION_MNIST}: "
            "run `apt-get install dataset-fashion-mnist`"
        )
    splits = FashionMNIST(tmp_path, download=False).load()
    assert splits.train.images.shape == (60000, 1, 28, 28)
    assert splits.test.images.shape == (10000, 1, 28, 28)
    assert counts(splits.train.labels) == {c: 6000 for c in range(10)}
    assert counts(splits.test.labels) == {c: 1000 for c in range(10)}
    assert len(splits.train.classes) == 10 and int(splits.train.images.max()) == 255


# ---------------------------------------------------------------- Tiny ImageNet

WORDS = {
    "n01443537": "goldfish, Carassius auratus",
    "n02085620": "Chihuahua",
    "n02125311": "cougar, puma, catamount",
    "n03000000": "cougar",  # a second class named "cougar"
    "n09999999": "a WordNet entry that is not a class",
}
WNIDS = ["n03000000", "n01443537", "n02125311", "n02085620"]  # wnids.txt is not sorted
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
        FileNotFoundError,
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
        FileNotFoundError,
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
        FileNotFoundError,
        "train/n02085620/images",
        ["class n02085620 of wnids.txt", INCOMPLETE],
    ),
    "no_val_annotations": (
        lambda f: (f / "val" / "val_annotations.txt").unlink(),
        FileNotFoundError,
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
        FileNotFoundError,
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


# ---------------------------------------------------------------- ImageFolder


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
        dm = ImageDataModule(
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
    dm = ImageDataModule(ImageFolder(tmp_path), None, MEAN, STD, test_fraction=0.0)
    with pytest.raises(ValueError, match="test_fraction is 0"):
        dm.setup()


def test_a_class_with_too_few_images_is_named_with_its_count(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["plenty", "rare"], n_per_class=5, splits=("",))
    for extra in sorted((tmp_path / "rare").iterdir())[2:]:
        extra.unlink()
    dm = ImageDataModule(ImageFolder(tmp_path), None, MEAN, STD)
    with pytest.raises(ValueError, match="'rare' has 2") as err:
        dm.setup()
    message = str(err.value)
    assert "'plenty'" not in message and "at least 3" in message
    assert "data.test_fraction=0.1" in message and "data.val_fraction=0.1" in message
    with_folders = ImageDataModule(
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


def rgb_at(path: Path, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    image = load_image(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_load_image_turns_every_mode_into_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (6, 4), 77).save(gray)
    assert rgb_at(gray) == (77, 77, 77)

    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert rgb_at(tmp_path / "palette.png") == (10, 200, 30)

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(cmyk, quality=95)
    assert all(v >= 250 for v in rgb_at(cmyk))  # no ink is white

    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(deep)  # 16-bit gray
    assert [rgb_at(deep, (x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I").save(wide)
    assert [rgb_at(wide, (x, 0)) for x in range(2)] == [(0,) * 3, (255,) * 3]


def test_load_image_puts_transparency_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent
    rgba.putpixel((2, 0), (255, 0, 0, 128))  # half transparent red
    rgba.save(tmp_path / "rgba.png")
    assert [rgb_at(tmp_path / "rgba.png", (x, 0)) for x in range(3)] == [
        (255, 0, 0),
        (255, 255, 255),
        (255, 127, 127),
    ]
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert rgb_at(tmp_path / "la.png") == (255, 255, 255)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "clear.gif", transparency=0)
    assert rgb_at(tmp_path / "clear.gif") == (255, 255, 255)
    assert rgb_at(tmp_path / "clear.gif", (1, 0)) == (10, 200, 30)


def test_load_image_follows_exif_orientation(tmp_path: Path) -> None:
    image = load_image(write_exif_rotated_jpeg(tmp_path / "photo.jpg", size=(20, 10)))
    assert image.size == (10, 20)
    red, green, _ = image.getpixel((8, 1))  # top-right corner, where the block turned to
    assert red > 200 and green < 60
    assert max(image.getpixel((1, 1))) < 60


def test_load_image_names_bad_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(OSError, match="broken.png"):
        load_image(broken)
    with pytest.raises(OSError, match="cut.jpg"):
        load_image(write_truncated_jpeg(tmp_path / "cut.jpg"))


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


def test_a_bad_file_fails_with_its_path_when_not_skipping(tmp_path: Path) -> None:
    bad = photo_folder(tmp_path)
    dm = ImageDataModule(
        ImageFolder(tmp_path), None, MEAN, STD, image_size=16, val_fraction=0, batch_size=64
    )
    dm.setup()
    assert len(dm.train_set) + len(dm.test_set) == 14
    with pytest.raises(OSError, match="could not decode image") as err:
        for loader in (dm.train_dataloader(), dm.test_dataloader()):
            list(loader)
    assert any(str(path) in str(err.value) for path in bad)


def test_bad_files_are_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = photo_folder(tmp_path)
    dm = ImageDataModule(
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


# ---------------------------------------------------------------- split helpers


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


# ---------------------------------------------------------------- DataModule


class CountingSource:
    """Wraps a source to count loads."""

    def __init__(self, source: CIFAR10) -> None:
        self.source, self.loads = source, 0

    def prepare(self) -> None:
        self.source.prepare()

    def load(self) -> Splits:
        self.loads += 1
        return self.source.load()

    def load_test(self) -> ImageSet | None:
        return self.source.load_test()


def test_datamodule_filters_splits_and_limits(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_per_class=20)
    source = CountingSource(CIFAR10(tmp_path, download=False))
    dm = ImageDataModule(
        source,
        {"crop_padding": 0.125, "hflip": 0.5},
        MEAN,
        STD,
        val_fraction=0.25,
        classes=["cat", "dog", "ship"],
        samples_per_class=7,
        batch_size=8,
    )
    dm.prepare_data()
    dm.setup("fit")
    train_set, val_set = dm.train_set, dm.val_set

    assert dm.classes == ["cat", "dog", "ship"]
    assert counts(train_set.labels) == {0: 7, 1: 7, 2: 7}
    assert counts(val_set.labels) == {0: 5, 1: 5, 2: 5}
    assert counts(dm.test_set.labels) == {0: 20, 1: 20, 2: 20}
    train_rows = {bytes(image.numpy()) for image in train_set.images}
    assert train_rows.isdisjoint(bytes(image.numpy()) for image in val_set.images)

    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1, 2}
    assert len(dm.train_dataloader()) == 3  # 21 images, the last batch kept
    images, _ = next(iter(dm.test_dataloader()))
    assert images.shape == (8, 3, 32, 32)  # eval_batch_size defaults to batch_size
    dm.setup("test")
    dm.setup("validate")
    assert source.loads == 1 and dm.train_set is train_set and dm.val_set is val_set


def test_datamodule_streams_files_and_keeps_a_source_val(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=3, splits=("train", "val", "test"))
    dm = ImageDataModule(ImageFolder(tmp_path), None, MEAN, STD, image_size=16, batch_size=4)
    dm.setup()
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [6, 6, 6]
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1]


def test_image_files_need_an_image_size(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=3, splits=("train", "test"))
    dm = ImageDataModule(ImageFolder(tmp_path), None, MEAN, STD, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"image_size=null.*set data\.image_size"):
        dm.setup()
    sized = ImageDataModule(ImageFolder(tmp_path), None, MEAN, STD, image_size=8, val_fraction=0)
    sized.setup()
    assert sized.preprocessing == Preprocessing(input_size=8, mean=MEAN, std=STD)


def test_the_preprocessing_resolved_at_setup(tmp_path: Path) -> None:
    """The backbone's statistics at the images' own size (in memory, image_size=null), gray for
    one-channel images; a given Preprocessing is used as it is, whatever the other arguments."""
    write_cifar10(tmp_path / "cifar", n_per_class=2)
    write_fashion_mnist(tmp_path / "fmnist", n_train=20, n_test=10)
    with pytest.raises(RuntimeError, match="setup"):
        _ = ImageDataModule(CIFAR10(tmp_path / "cifar"), None, MEAN, STD).loader
    cifar = ImageDataModule(CIFAR10(tmp_path / "cifar", download=False), None, MEAN, STD)
    assert cifar.preprocessing is None and cifar.backbone_mean == MEAN
    cifar.setup()
    assert cifar.preprocessing == Preprocessing(input_size=32, mean=MEAN, std=STD)
    fashion = FashionMNIST(tmp_path / "fmnist", download=False, system_dir=None)
    gray = ImageDataModule(fashion, None, MEAN, STD, image_size=40)
    gray.setup()
    assert gray.preprocessing == Preprocessing(input_size=40, mean=MEAN, std=STD, grayscale=True)

    given = Preprocessing(input_size=24, mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1], resize_size=30)
    dm = ImageDataModule(
        CIFAR10(tmp_path / "cifar", download=False),
        None,
        MEAN,
        STD,
        normalize="dataset",
        preprocessing=given,
        batch_size=64,
    )
    dm.setup()
    assert dm.preprocessing is given
    images, _ = next(iter(dm.test_dataloader()))
    expected = torch.stack([given.transform()(image) for image in dm.test_set.images])
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def fashion_test_only(tmp_path: Path) -> tuple[Path, Path]:
    """Fashion-MNIST's four files in `full/`, and copies of only the two test files in `test/`."""
    full = write_fashion_mnist(tmp_path / "full", n_train=40, n_test=20)
    test = tmp_path / "test"
    test.mkdir()
    for stem in fmnist.TEST_FILES:
        shutil.copy(full / f"{stem}.gz", test)
    return full, test


def batches(loader: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images, labels) for images, labels in loader]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_a_test_only_datamodule_reads_only_the_fashion_mnist_test_files(tmp_path: Path) -> None:
    full_dir, test_dir = fashion_test_only(tmp_path)
    assert sorted(p.name for p in test_dir.iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]

    def fashion(root: Path) -> FashionMNIST:
        return FashionMNIST(root, download=False, system_dir=None)

    full = ImageDataModule(fashion(full_dir), None, MEAN, STD, batch_size=8)
    full.prepare_data()
    full.setup("test")
    trained = full.preprocessing  # what a checkpoint of a run on this data stores
    assert trained == Preprocessing(input_size=28, mean=MEAN, std=STD, grayscale=True)

    with pytest.raises(ValueError, match="test_only.*preprocessing"):
        ImageDataModule(fashion(test_dir), None, MEAN, STD, test_only=True)
    only = ImageDataModule(
        fashion(test_dir), None, MEAN, STD, preprocessing=trained, test_only=True, batch_size=8
    )
    only.prepare_data()
    only.setup("test")
    assert only.train_set is None and only.val_set is None
    assert only.preprocessing is trained and only.classes == full.classes
    assert torch.equal(only.test_set.images, full.test_set.images)
    assert torch.equal(only.test_set.labels, full.test_set.labels) and len(only.test_set) == 20
    assert_same_batches(batches(only.test_dataloader()), batches(full.test_dataloader()))

    # Without test_only the training files are needed, and missing.
    everything = ImageDataModule(fashion(test_dir), None, MEAN, STD)
    with pytest.raises(DataUnavailableError, match="train-images-idx3-ubyte.gz"):
        everything.prepare_data()
    with pytest.raises(DataUnavailableError, match="download is off"):
        everything.setup("test")


def test_a_test_only_datamodule_reads_an_image_folder_with_only_test(tmp_path: Path) -> None:
    full_dir = write_image_folder(tmp_path / "full", ["a", "b", "c"], 3, ("train", "test"))
    test_dir = tmp_path / "test_only"
    shutil.copytree(full_dir / "test", test_dir / "test")
    full = ImageDataModule(
        ImageFolder(full_dir), None, MEAN, STD, image_size=8, val_fraction=0, batch_size=4
    )
    full.setup("test")
    trained = full.preprocessing
    assert trained == Preprocessing(input_size=8, mean=MEAN, std=STD)

    only = ImageDataModule(
        ImageFolder(test_dir), None, MEAN, STD, preprocessing=trained, test_only=True, batch_size=4
    )
    only.prepare_data()
    only.setup("test")
    assert only.train_set is None and only.val_set is None
    assert only.classes == full.classes == ["a", "b", "c"]
    assert [p.relative_to(test_dir) for p in only.test_set.images] == [
        p.relative_to(full_dir) for p in full.test_set.images
    ]
    assert torch.equal(only.test_set.labels, full.test_set.labels)
    assert_same_batches(batches(only.test_dataloader()), batches(full.test_dataloader()))

    everything = ImageDataModule(ImageFolder(test_dir), None, MEAN, STD, image_size=8)
    with pytest.raises(ValueError, match="no train/ folder"):
        everything.setup("test")


def test_every_source_reads_its_test_set_alone(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar", n_per_class=2)
    write_fashion_mnist(tmp_path / "fmnist", n_train=20, n_test=10)
    write_tiny_imagenet(tmp_path / "tiny", words=WORDS, wnids=WNIDS, n_train=2, n_val=2)
    write_image_folder(tmp_path / "folder", ["a", "b"], n_per_class=2, splits=("train", "test"))
    sources = [
        CIFAR10(tmp_path / "cifar", download=False),
        FashionMNIST(tmp_path / "fmnist", download=False, system_dir=None),
        TinyImageNet(tmp_path / "tiny", download=False),
        ImageFolder(tmp_path / "folder"),
    ]
    for source in sources:
        test, expected = source.load_test(), source.load().test
        assert test.classes == expected.classes and torch.equal(test.labels, expected.labels)
        if test.in_memory:
            assert torch.equal(test.images, expected.images)
        else:
            assert test.images == expected.images
    write_image_folder(tmp_path / "no_test", ["a", "b"], n_per_class=2, splits=("train",))
    assert ImageFolder(tmp_path / "no_test").load_test() is None
    for archive in (CIFAR10, TinyImageNet):
        assert issubclass(archive, ArchiveSource)
        assert archive(tmp_path).md5 == archive.MD5 and archive(tmp_path, md5=None).md5 is None


def test_datamodule_loader_options(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_per_class=2)
    dm = ImageDataModule(
        CIFAR10(tmp_path, download=False),
        None,
        MEAN,
        STD,
        num_workers=2,
        eval_batch_size=5,
        pin_memory=True,
        loader="dataloader",
    )
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.classes
    dm.setup()
    train, test = dm.train_dataloader(), dm.test_dataloader()
    assert train.persistent_workers and train.num_workers == 2 and train.pin_memory
    assert not train.drop_last and test.batch_size == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"samples_per_class": 0}, "samples_per_class"),
        ({"samples_per_class": 2.5}, "samples_per_class"),
        ({"batch_size": 0}, "batch_size"),
        ({"classes": "cat"}, "classes"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"image_size": 0}, "image_size"),
        ({"skip_bad_images": "yes"}, "skip_bad_images"),
        ({"loader": "gpu"}, r"data.loader must be one of \['auto', 'device', 'dataloader'\]"),
        (
            {"normalize": "imagenet"},
            r"data.normalize must be one of \['backbone', 'dataset'\], got 'imagenet'",
        ),
    ],
)
def test_datamodule_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageDataModule(CIFAR10(tmp_path), None, MEAN, STD, **kwargs)


def test_datamodule_runs_under_a_trainer(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_per_class=4)

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3 * 32 * 32, 10)

        def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            images, labels = batch
            return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return self.step(batch)

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
            self.log("val/loss", self.step(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageDataModule(CIFAR10(tmp_path, download=False), None, MEAN, STD, batch_size=16)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Linear(), datamodule=dm)
    assert trainer.num_training_batches == 2  # 36 of 40 images: 4 held out for validation
    assert trainer.num_val_batches == [1] and dm.classes == CIFAR10_CLASSES


# ---------------------------------------------------------------- configs


def compose_data(
    tmp_path: Path, name: str, *overrides: str, data_dir: Path | None = None
) -> DictConfig:
    """The root config as Hydra composes it with `data=name` (the option's own keys on top of
    conf/data_base.yaml), `paths.data_dir` (default `tmp_path`) and `seed` set; `cfg.data` is the
    data group."""
    fixed = [f"data={name}", f"paths.data_dir={data_dir or tmp_path}", "seed=0"]
    return compose_config("train", [*fixed, *overrides], tmp_path / "run")


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist", "imagefolder", "tiny_imagenet"])
def test_data_configs_instantiate(tmp_path: Path, name: str) -> None:
    overrides = [f"data.root={tmp_path / 'images'}"] if name == "imagefolder" else []
    cfg = compose_data(tmp_path, name, *overrides)
    for key in ("mean", "std", "augment"):
        assert key not in cfg.data
    # The shared keys come from conf/data_base.yaml; the option's own keys override them.
    assert cfg.data._target_ == "thaw.data.datamodule.ImageDataModule"
    assert cfg.data.loader == "auto" and cfg.data.normalize == "backbone"
    assert cfg.data.val_fraction == 0.1 and cfg.data.seed == 0
    assert cfg.data.source._target_.startswith("thaw.data.sources.")
    own = {"image_size": 224, "batch_size": 32} if name == "imagefolder" else {}
    assert (cfg.data.image_size, cfg.data.batch_size) == (
        own.get("image_size"),
        own.get("batch_size", 128),
    )
    dm = instantiate(cfg.data, augment={"hflip": 0.5}, mean=MEAN, std=STD)
    assert isinstance(dm, ImageDataModule)
    assert dm.source.root == dm.root
    expected_root = tmp_path / "images" if name == "imagefolder" else tmp_path / name
    assert dm.root == expected_root


def test_imagefolder_config_needs_a_root(tmp_path: Path) -> None:
    cfg = compose_data(tmp_path, "imagefolder")
    assert OmegaConf.is_missing(cfg.data, "root")


def test_data_root_override_reaches_the_source(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "mine", n_per_class=2)
    cfg = compose_data(
        tmp_path,
        "cifar10",
        f"data.root={tmp_path / 'mine'}",
        "data.source.download=false",
        "data.classes=[cat,dog]",
        "data.num_workers=0",
        data_dir=tmp_path / "unused",
    )
    dm = instantiate(cfg.data, augment=None, mean=MEAN, std=STD)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and len(dm.test_set) == 4


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
        dm = ImageDataModule(make(), None, MEAN, STD, image_size=8, folds=3, fold=fold, **options)
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
        ImageDataModule(None, None, MEAN, STD, fold=1)
    with pytest.raises(ValueError, match=r"data.fold=0,1,2,3,4"):
        ImageDataModule(None, None, MEAN, STD, folds=5)
    with pytest.raises(ValueError, match=r"\[0, 2\], got 3"):
        ImageDataModule(None, None, MEAN, STD, folds=3, fold=3)
    labels = torch.tensor([0, 0, 0, 1, 1])
    small = ImageSet(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), labels, ["many", "few"])
    with pytest.raises(ValueError, match="data.folds=3 needs 3 or more .* 'few' has 2"):
        fold_split(small, 3, 0, seed=0)
