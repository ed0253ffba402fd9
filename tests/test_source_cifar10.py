"""The CIFAR-10 source: its batch pickles read exactly, the archive downloaded, checked against
its md5 and extracted, and what the errors say when it is wrong or missing."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data_formats import (
    CIFAR10_CLASSES,
    cifar10_archive,
    closed_port_url,
    counts,
    loopback_fixture,  # noqa: F401 (the `loopback` fixture)
    serve_directory,
    write_cifar10,
    write_cifar_batch,
)
from thaw.data import DataUnavailableError
from thaw.data.sources.cifar10 import CIFAR10
from thaw.data.sources.download import ChecksumError


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
