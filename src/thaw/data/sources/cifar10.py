"""CIFAR-10 from the official python archive (cifar-10-python.tar.gz), read with our own reader."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from thaw.data.sources.base import ArchiveSource, ImageSet, Splits
from thaw.errors import UserError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"


class CIFAR10(ArchiveSource):
    """CIFAR-10 as uint8 tensors (N, 3, 32, 32): 50000 train, 10000 test, no validation split."""

    NAME = "CIFAR-10"
    FOLDER = "cifar-10-batches-py"
    URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    MD5 = "c58f30108f718f92721af3b95e74349a"

    def load(self) -> Splits:
        return Splits(train=self._read(TRAIN_BATCHES), test=self._read_test())

    def load_test(self) -> ImageSet:
        return self._read_test()

    def _read_test(self) -> ImageSet:
        return self._read((TEST_BATCH,))

    def _read(self, batches: tuple[str, ...]) -> ImageSet:
        self.extract()
        classes = [name.decode() for name in _unpickle(self.folder / META)[b"label_names"]]
        return _read_batches([self.folder / name for name in batches], classes)


def _unpickle(path: Path) -> dict[bytes, object]:
    """The batches were pickled by Python 2: keys are bytes, hence encoding="bytes"."""
    if not path.is_file():
        raise UserError(
            f"CIFAR-10 file {path} is missing; delete {path.parent} to extract it again"
        )
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _read_batches(paths: list[Path], classes: list[str]) -> ImageSet:
    """Rows of 3072 bytes are 1024 red, 1024 green, 1024 blue values, each plane row-major."""
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise UserError(
                f"{path}: expected data (N, 3072) and N labels, "
                f"got data {data.shape} and {len(batch_labels)} labels"
            )
        if len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < len(classes):
            raise UserError(f"{path}: labels outside 0..{len(classes) - 1}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        labels.append(torch.from_numpy(batch_labels))
    return ImageSet(torch.cat(images), torch.cat(labels), classes)
