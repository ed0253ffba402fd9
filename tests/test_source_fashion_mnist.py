"""The Fashion-MNIST source: idx files read exactly (gzipped or not), the system copy found, the
download checked against md5 sums, what the errors say, and Debian's real files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from data_formats import (
    closed_port_url,
    counts,
    loopback_fixture,  # noqa: F401 (the `loopback` fixture)
    serve_directory,
    write_fashion_mnist,
    write_idx,
)
from thaw.data import DataUnavailableError
from thaw.data.sources import fashion_mnist as fmnist
from thaw.data.sources.fashion_mnist import FashionMNIST

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


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
