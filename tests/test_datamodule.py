"""ImageDataModule: filtering, splits and limits, streamed files, the preprocessing it
resolves, test-only reading, loader options, argument checks, and a run under a Trainer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from data_formats import (
    CIFAR10_CLASSES,
    MEAN,
    STD,
    WNIDS,
    WORDS,
    counts,
    write_cifar10,
    write_fashion_mnist,
    write_image_folder,
    write_tiny_imagenet,
)
from datamodules import make_datamodule
from thaw.data import DataUnavailableError, ImageSet, Splits
from thaw.data.sources import fashion_mnist as fmnist
from thaw.data.sources.base import ArchiveSource
from thaw.data.sources.cifar10 import CIFAR10
from thaw.data.sources.fashion_mnist import FashionMNIST
from thaw.data.sources.imagefolder import ImageFolder
from thaw.data.sources.tiny_imagenet import TinyImageNet
from thaw.preprocess import Preprocessing


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
    dm = make_datamodule(
        source,
        {"crop_padding": 0.125, "hflip": 0.5},
        MEAN,
        STD,
        val_fraction=0.25,
        classes=["cat", "dog", "ship"],
        samples_per_class=7,
        batch_size=8,
        eval_batch_size=None,
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
    assert images.shape == (8, 3, 32, 32)  # eval_batch_size null: batch_size
    dm.setup("test")
    dm.setup("validate")
    assert source.loads == 1 and dm.train_set is train_set and dm.val_set is val_set


def test_datamodule_streams_files_and_keeps_a_source_val(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=3, splits=("train", "val", "test"))
    dm = make_datamodule(
        ImageFolder(tmp_path), None, MEAN, STD, image_size=16, batch_size=4, eval_batch_size=None
    )
    dm.setup()
    assert [len(dm.train_set), len(dm.val_set), len(dm.test_set)] == [6, 6, 6]
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1]


def test_image_files_need_an_image_size(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=3, splits=("train", "test"))
    dm = make_datamodule(ImageFolder(tmp_path), None, MEAN, STD, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"image_size=null.*set data\.image_size"):
        dm.setup()
    sized = make_datamodule(ImageFolder(tmp_path), None, MEAN, STD, image_size=8, val_fraction=0)
    sized.setup()
    assert sized.preprocessing == Preprocessing(input_size=8, mean=MEAN, std=STD)


def test_the_preprocessing_resolved_at_setup(tmp_path: Path) -> None:
    """The backbone's statistics at the images' own size (in memory, image_size=null), gray for
    one-channel images; a given Preprocessing is used as it is, whatever the other arguments."""
    write_cifar10(tmp_path / "cifar", n_per_class=2)
    write_fashion_mnist(tmp_path / "fmnist", n_train=20, n_test=10)
    with pytest.raises(RuntimeError, match="setup"):
        _ = make_datamodule(CIFAR10(tmp_path / "cifar"), None, MEAN, STD).loader
    cifar = make_datamodule(CIFAR10(tmp_path / "cifar", download=False), None, MEAN, STD)
    assert cifar.preprocessing is None and cifar.backbone_mean == MEAN
    cifar.setup()
    assert cifar.preprocessing == Preprocessing(input_size=32, mean=MEAN, std=STD)
    fashion = FashionMNIST(tmp_path / "fmnist", download=False, system_dir=None)
    gray = make_datamodule(fashion, None, MEAN, STD, image_size=40)
    gray.setup()
    assert gray.preprocessing == Preprocessing(input_size=40, mean=MEAN, std=STD, grayscale=True)

    given = Preprocessing(input_size=24, mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1], resize_size=30)
    dm = make_datamodule(
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

    full = make_datamodule(fashion(full_dir), None, MEAN, STD, batch_size=8)
    full.prepare_data()
    full.setup("test")
    trained = full.preprocessing  # what a checkpoint of a run on this data stores
    assert trained == Preprocessing(input_size=28, mean=MEAN, std=STD, grayscale=True)

    with pytest.raises(ValueError, match="test_only.*preprocessing"):
        make_datamodule(fashion(test_dir), None, MEAN, STD, test_only=True)
    only = make_datamodule(
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
    everything = make_datamodule(fashion(test_dir), None, MEAN, STD)
    with pytest.raises(DataUnavailableError, match="train-images-idx3-ubyte.gz"):
        everything.prepare_data()
    with pytest.raises(DataUnavailableError, match="download is off"):
        everything.setup("test")


def test_a_test_only_datamodule_reads_an_image_folder_with_only_test(tmp_path: Path) -> None:
    full_dir = write_image_folder(tmp_path / "full", ["a", "b", "c"], 3, ("train", "test"))
    test_dir = tmp_path / "test_only"
    shutil.copytree(full_dir / "test", test_dir / "test")
    full = make_datamodule(
        ImageFolder(full_dir), None, MEAN, STD, image_size=8, val_fraction=0, batch_size=4
    )
    full.setup("test")
    trained = full.preprocessing
    assert trained == Preprocessing(input_size=8, mean=MEAN, std=STD)

    only = make_datamodule(
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

    everything = make_datamodule(ImageFolder(test_dir), None, MEAN, STD, image_size=8)
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
    dm = make_datamodule(
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
        ({"foo": 1}, "data.foo: not a data setting; the data settings are batch_size, "),
        (
            {"normalize": "imagenet"},
            r"data.normalize must be one of \['backbone', 'dataset'\], got 'imagenet'",
        ),
    ],
)
def test_datamodule_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_datamodule(CIFAR10(tmp_path), None, MEAN, STD, **kwargs)


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

    dm = make_datamodule(CIFAR10(tmp_path, download=False), None, MEAN, STD, batch_size=16)
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
