"""The two data paths: the device path (uint8 set on the device, whole batches augmented there)
and the per-image DataLoader path agree, resume exactly, and are chosen as `data.loader` says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from data_formats import write_cifar10, write_image_folder
from datamodules import make_datamodule
from thaw.data.augment.batch import BatchAugment
from thaw.data.augment.options import AugmentOptions
from thaw.data.datamodule import ImageDataModule
from thaw.data.loader_choice import LOADERS, LoaderChoice, choose_loader
from thaw.data.resumable import DeviceLoader, ResumableLoader
from thaw.data.sources.cifar10 import CIFAR10
from thaw.data.sources.imagefolder import ImageFolder

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.1]
BASIC = {"crop_padding": 0.125, "hflip": 0.5, "color_jitter": 0.2}
AUTO_DEVICE = "data.loader=auto: in memory, every augmentation batches"


def cifar(tmp_path: Path, augment: dict | None = None, **kwargs: object) -> ImageDataModule:
    write_cifar10(tmp_path, n_per_class=3)
    dm = make_datamodule(
        CIFAR10(tmp_path, download=False), augment, MEAN, STD, batch_size=8, seed=3, **kwargs
    )
    dm.setup()
    return dm


def options(**values: object) -> AugmentOptions:
    return AugmentOptions.parse(values)


@pytest.mark.parametrize(
    ("requested", "in_memory", "augment", "path", "reason"),
    [
        ("auto", True, BASIC, "device", AUTO_DEVICE),
        ("auto", True, {**BASIC, "mixup_alpha": 0.2, "cutmix_alpha": 1.0}, "device", AUTO_DEVICE),
        ("auto", False, BASIC, "dataloader", "data.loader=auto: images are files"),
        (
            "auto",
            False,
            {"policy": "randaugment"},
            "dataloader",
            "data.loader=auto: images are files",
        ),
        ("auto", True, {**BASIC, "policy": "randaugment"}, "device", AUTO_DEVICE),
        (
            "auto",
            True,
            {**BASIC, "policy": "autoaugment"},
            "dataloader",
            "data.loader=auto: policy=autoaugment only per image",
        ),
        ("auto", True, {**BASIC, "random_erasing": 0.25}, "device", AUTO_DEVICE),
        ("dataloader", True, BASIC, "dataloader", "data.loader=dataloader"),
        ("dataloader", False, {"policy": "randaugment"}, "dataloader", "data.loader=dataloader"),
        ("device", True, BASIC, "device", "data.loader=device"),
    ],
)
def test_choose_loader_picks_the_path_and_says_why(
    requested: str, in_memory: bool, augment: dict, path: str, reason: str
) -> None:
    choice = choose_loader(requested, in_memory, options(**augment))
    assert isinstance(choice, LoaderChoice)
    assert choice.path == path and choice.reason == reason
    assert tuple(choice) == (path, reason)  # logged as "path (reason)"


def test_choose_loader_refuses_an_explicit_device_path_naming_the_fix() -> None:
    assert LOADERS == ("auto", "device", "dataloader")
    with pytest.raises(ValueError, match=r"held in memory.*use data\.loader=dataloader"):
        choose_loader("device", False, options(**BASIC))
    with pytest.raises(ValueError, match=r"policy=autoaugment .*data\.loader=dataloader"):
        choose_loader("device", True, options(**BASIC, policy="autoaugment"))
    with pytest.raises(ValueError, match=r"policy=trivialaugment only runs per image.*dataloader"):
        choose_loader("device", True, options(policy="trivialaugment", random_erasing=0.5))


def test_auto_takes_the_device_path_where_data_and_augment_allow(tmp_path: Path) -> None:
    basic = cifar(tmp_path / "basic", BASIC)
    assert basic.settings.loader == "auto" and basic.loader == "device"
    assert basic.loader_choice == ("device", AUTO_DEVICE)
    assert isinstance(basic.train_transform, BatchAugment) and basic.train_transform.train
    assert isinstance(basic.eval_transform, BatchAugment) and not basic.eval_transform.train
    assert isinstance(cifar(tmp_path / "b", BASIC).train_dataloader(), DeviceLoader)
    policy = cifar(tmp_path / "policy", {"policy": "trivialaugment"})
    assert policy.loader == "dataloader"
    assert "policy=trivialaugment" in policy.loader_choice.reason
    assert isinstance(policy.train_transform, v2.Compose)
    assert isinstance(policy.eval_transform, v2.Compose)
    assert isinstance(policy.train_dataloader(), ResumableLoader)
    write_image_folder(tmp_path / "photos", ["a", "b"], n_per_class=5)
    folder = make_datamodule(ImageFolder(tmp_path / "photos"), None, MEAN, STD, image_size=8)
    with pytest.raises(RuntimeError, match="setup"):
        _ = folder.loader  # chosen at setup, from the data found there
    folder.setup()
    assert folder.loader == "dataloader"
    assert folder.loader_choice.reason == "data.loader=auto: images are files"


def test_an_explicit_device_path_it_cannot_take_says_why_at_setup(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_per_class=2)
    policy = make_datamodule(
        CIFAR10(tmp_path, download=False), {"policy": "trivialaugment"}, MEAN, STD, loader="device"
    )
    assert policy.settings.loader == "device"
    policy.prepare_data()
    with pytest.raises(ValueError, match="policy=trivialaugment.*data.loader=dataloader"):
        policy.setup()
    write_image_folder(tmp_path / "photos", ["a", "b"], n_per_class=5)
    folder = make_datamodule(
        ImageFolder(tmp_path / "photos"), None, MEAN, STD, image_size=8, loader="device"
    )
    with pytest.raises(ValueError, match="held in memory.*data.loader=dataloader"):
        folder.setup()
    # The same data and augmentation on the path that can take them.
    explicit = make_datamodule(
        CIFAR10(tmp_path, download=False), {"policy": "randaugment"}, MEAN, STD, loader="dataloader"
    )
    explicit.setup()
    assert explicit.loader_choice == ("dataloader", "data.loader=dataloader")


def test_both_paths_give_the_same_evaluation_batches(tmp_path: Path) -> None:
    device = cifar(tmp_path, BASIC, loader="device")
    per_image = cifar(tmp_path, BASIC, loader="dataloader", num_workers=0)
    for split in ("val", "test"):
        a = list(device.plain_loader(split))
        b = list(per_image.plain_loader(split))
        assert len(a) == len(b) > 0
        for (images_a, labels_a), (images_b, labels_b) in zip(a, b, strict=True):
            assert torch.equal(labels_a, labels_b)
            torch.testing.assert_close(images_a, images_b, atol=1e-5, rtol=0)


def test_both_paths_visit_the_same_training_order(tmp_path: Path) -> None:
    device = cifar(tmp_path, BASIC, loader="device").train_dataloader()
    per_image = cifar(tmp_path, BASIC, loader="dataloader", num_workers=0).train_dataloader()
    for epoch in (0, 1):
        device.sampler.set_epoch(epoch)
        per_image.sampler.set_epoch(epoch)
        labels_a = torch.cat([labels for _, labels in device])
        labels_b = torch.cat([labels for _, labels in per_image])
        assert torch.equal(labels_a, labels_b)
    assert len(device) == len(per_image) == 3  # 24 images, batches of 8


def test_device_loader_is_seeded_and_resumes_mid_epoch(tmp_path: Path) -> None:
    loader = cifar(tmp_path, BASIC).train_dataloader()
    first = list(loader)
    again = list(cifar(tmp_path, BASIC).train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], first[1][0])

    state = {"epoch": 0, "batches": 1, "seed": 3}
    resumed = cifar(tmp_path, BASIC).train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 2
    for (images_a, labels_a), (images_b, labels_b) in zip(first[1:], rest, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    resumed.sampler.set_epoch(1)
    next_epoch = list(resumed)
    assert len(next_epoch) == 3 and not torch.equal(next_epoch[0][0], first[0][0])


def test_device_loader_shards_training_across_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr("thaw.data.resumable.rank_and_world", lambda r=rank: (r, 2))
        loader = DeviceLoader(images, torch.arange(10), lambda x, g: x, seed=1, batch_size=2)
        seen.append(torch.cat([labels for _, labels in loader]).tolist())
        evaluation = DeviceLoader(images, torch.arange(10), lambda x, g: x, 1, 4, shuffle=False)
        assert torch.cat([labels for _, labels in evaluation]).tolist() == list(range(10))
    assert len(seen[0]) == len(seen[1]) == 5 and sorted(seen[0] + seen[1]) == list(range(10))


def test_a_loader_serves_cached_rows_in_the_order_it_serves_images(tmp_path: Path) -> None:
    for path in ("device", "dataloader"):
        loader = cifar(tmp_path, None, loader=path, num_workers=0).train_dataloader()
        loader.sampler.set_epoch(2)
        labels = [labels for _, labels in loader]
        loader.cached = torch.arange(len(loader.labels)).float().unsqueeze(1) * 10
        batches = list(loader)
        for (rows, cached_labels), image_labels in zip(batches, labels, strict=True):
            assert torch.equal(cached_labels, image_labels)
            assert torch.equal(loader.labels[(rows[:, 0] / 10).long()], image_labels)
