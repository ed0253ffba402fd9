"""Augmentation and normalisation: every preset's per-image pipeline, random erasing, MixUp/CutMix
from the DataModule into the training task, dataset statistics, and the pictures of a batch
(scripts/show_batch.py and the TensorBoard preview)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import load_script, offline_fmnist
from data_formats import write_cifar10
from datamodules import make_datamodule
from thaw.config import config_dir
from thaw.data import ImageSet, Splits
from thaw.data.augment.batch import unsupported
from thaw.data.augment.mixing import BatchMix
from thaw.data.augment.options import AugmentOptions
from thaw.data.augment.per_image import build_train_transform
from thaw.data.datamodule import ImageDataModule
from thaw.data.sources.cifar10 import CIFAR10
from thaw.data.sources.imagefolder import ImageFolder
from thaw.preprocess import Preprocessing
from thaw.train import run
from thaw.visualize import CAPTION, CELL, PAD, batch_grid

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (config_dir() / "augment").glob("*.yaml"))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def augment_conf(name: str) -> dict:
    """A preset as Hydra composes it (the presets build on augment/none)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return OmegaConf.to_container(compose(f"augment/{name}").augment)


def prep(size: int) -> Preprocessing:
    """Square `size` x `size` input, normalised with MEAN and STD (at an image's own size the
    resize and crop leave it as it is)."""
    return Preprocessing(input_size=size, mean=MEAN, std=STD)


def normalised_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    """The values pixel 0 and pixel 255 take after normalising, per channel, as (3, 1, 1)."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (0 - mean) / std - 1e-5, (1 - mean) / std + 1e-5


# ---------------------------------------------------------------- per-image transforms


def test_the_presets_are_the_documented_ones() -> None:
    expected = {"none", "basic", "randaugment", "trivialaugment", "autoaugment", "mixup", "cutmix"}
    assert set(PRESETS) == expected
    assert augment_conf("basic") == {
        **augment_conf("none"),
        "crop_padding": 0.125,
        "hflip": 0.5,
        "color_jitter": 0.2,
    }


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_gives_normalised_rgb_floats(name: str) -> None:
    torch.manual_seed(0)
    options = {**augment_conf(name), "random_erasing": 0.5}
    low, high = normalised_bounds()
    colour = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    for image, size, shape in [
        (colour, 32, (3, 32, 32)),
        (torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8), 28, (3, 28, 28)),
        (Image.new("RGB", (48, 36), (200, 30, 90)), 24, (3, 24, 24)),
    ]:
        transform = build_train_transform(options, prep(size))
        for _ in range(3):
            out = transform(image)
            assert out.shape == shape and out.dtype == torch.float32
            assert ((out >= low) & (out <= high)).all()
    plain = prep(32).transform()(colour)
    outputs = [build_train_transform(options, prep(32))(colour) for _ in range(20)]
    assert sum(not torch.equal(out, plain) for out in outputs) >= 4  # erasing alone: p = 0.5


@pytest.mark.parametrize(
    ("name", "loader"),
    [(name, "dataloader") for name in PRESETS]
    + [(name, "device") for name in PRESETS if not unsupported(augment_conf(name))],
)
def test_evaluation_stays_deterministic_under_every_preset(
    tmp_path: Path, name: str, loader: str
) -> None:
    write_cifar10(tmp_path, n_per_class=2)
    dm = make_datamodule(
        CIFAR10(tmp_path, download=False),
        augment_conf(name),
        MEAN,
        STD,
        batch_size=32,
        loader=loader,
    )
    # As in validation during fit, on the CPU.
    dm.trainer = SimpleNamespace(training=False, strategy=SimpleNamespace(root_device="cpu"))
    dm.setup()
    assert dm.loader == loader and dm.preprocessing == prep(32)
    evaluate = prep(32).transform()
    expected = torch.stack([evaluate(image) for image in dm.test_set.images])
    for _ in range(2):
        batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
        assert len(batch) == 2 and torch.equal(batch[0], expected)
        assert torch.equal(batch[1], dm.test_set.labels)


def test_transforms_output_float_rgb_at_the_requested_size() -> None:
    gray = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    out = prep(28).transform()(gray)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))
    basic = augment_conf("basic")
    wide = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    assert build_train_transform(basic, prep(40))(wide).shape == (3, 40, 40)
    pil = Image.new("L", (48, 32))
    assert build_train_transform(basic, prep(24))(pil).shape == (3, 24, 24)


def test_eval_transform_is_deterministic_and_equals_train_without_augment() -> None:
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    evaluate = prep(16).transform()
    train = build_train_transform(augment_conf("none"), prep(16))
    assert torch.equal(evaluate(image), evaluate(image))
    assert all(torch.equal(train(image), evaluate(image)) for _ in range(5))


def test_augmentations_vary_the_output() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    plain = prep(32).transform()(image)

    flip = build_train_transform({"hflip": 1.0}, prep(32))
    assert torch.equal(flip(image), plain.flip(-1))

    crop = build_train_transform({"crop_padding": 0.125}, prep(32))
    crops = [crop(image) for _ in range(20)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    assert len({c.numpy().tobytes() for c in crops}) > 1

    for name in ("basic", "randaugment", "trivialaugment", "autoaugment"):
        transform = build_train_transform(augment_conf(name), prep(32))
        outputs = [transform(image) for _ in range(10)]
        assert sum(not torch.equal(out, plain) for out in outputs) >= 8, name


def test_random_erasing_fills_a_rectangle_with_the_mean_colour() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    erase = build_train_transform({"random_erasing": 1.0}, prep(32))
    plain = prep(32).transform()(image)
    for _ in range(5):
        out = erase(image)
        erased = (out == 0).all(0)  # 0 after normalising is the mean colour
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        assert erased.sum() >= 0.02 * 32 * 32
        assert erased.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert torch.equal(out[:, ~erased], plain[:, ~erased])


@pytest.mark.parametrize(
    ("augment", "match"),
    [
        ({"vflip": 0.5, "hflip": 0.5}, r"unknown augment keys \['vflip'\].*crop_padding"),
        ({"hflip": 1.5}, r"augment.hflip must be a number in \[0, 1\], got 1.5"),
        ({"policy": "randaug"}, r"augment.policy must be one of \['none', 'randaugment', "),
        ({"magnitude": 31}, r"augment.magnitude must be an integer in \[0, 30\], got 31"),
        ({"autoaugment_policy": "mnist"}, r"\['imagenet', 'cifar10', 'svhn'\], got 'mnist'"),
        ({"random_erasing": True}, r"augment.random_erasing must be a number in \[0, 1\]"),
        ({"mixup_alpha": -0.2}, r"augment.mixup_alpha must be a number >= 0, got -0.2"),
        ({"mix_prob": 2}, r"augment.mix_prob must be a number in \[0, 1\], got 2"),
    ],
)
def test_augment_config_errors_name_key_value_and_allowed(augment: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_datamodule(CIFAR10("unused"), augment, MEAN, STD)


# ---------------------------------------------------------------- MixUp / CutMix


def mixed(options: dict, seed: int = 0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    images = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % 5  # every image's neighbour in the batch has another class
    return (images, labels, *BatchMix(AugmentOptions.parse(options), 5)(images, labels))


def test_mixup_blends_images_and_targets_alike() -> None:
    images, labels, out, hard, soft = mixed({"mixup_alpha": 0.4})
    assert torch.equal(hard, labels) and soft.shape == (8, 5) and soft.dtype == torch.float32
    assert torch.allclose(soft.sum(1), torch.ones(8)) and (soft >= 0).all()
    lam = float(soft[0, labels[0]])
    assert 0 < lam < 1
    assert torch.allclose(out, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
    assert torch.allclose(soft[torch.arange(8), labels], torch.full((8,), lam))


def test_cutmix_pastes_a_patch_and_weights_targets_by_area() -> None:
    images, labels, out, hard, soft = mixed({"cutmix_alpha": 1.0}, seed=3)
    assert torch.equal(hard, labels) and torch.allclose(soft.sum(1), torch.ones(8))
    pasted = (out == images.roll(1, 0)).all(1) & (out != images).any(1)
    share = pasted.float().mean((1, 2))
    assert share.max() > 0 and torch.allclose(soft[torch.arange(8), labels], 1 - share)


def test_mix_prob_and_both_mixes() -> None:
    outcomes = set()
    for seed in range(12):
        images, labels, out, _, soft = mixed(
            {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "mix_prob": 0.5}, seed
        )
        assert torch.allclose(soft.sum(1), torch.ones(8))
        if torch.equal(out, images):
            assert torch.equal(soft, torch.nn.functional.one_hot(labels, 5).float())
            outcomes.add("unmixed")
        else:
            outcomes.add("cutmix" if ((out == images).all(1)).any() else "mixup")
    assert outcomes == {"unmixed", "mixup", "cutmix"}


def test_datamodule_mixes_training_batches_only(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_per_class=2)
    dm = make_datamodule(
        CIFAR10(tmp_path, download=False), {"mixup_alpha": 0.4}, MEAN, STD, batch_size=8
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no trainer: predict, scripts
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = SimpleNamespace(training=True)
    images, labels, soft = dm.on_after_batch_transfer(batch, 0)
    assert images.shape == batch[0].shape and torch.equal(labels, batch[1])
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    plain = make_datamodule(CIFAR10(tmp_path, download=False), augment_conf("basic"), MEAN, STD)
    plain.setup()
    plain.trainer = SimpleNamespace(training=True)
    assert plain.on_after_batch_transfer(batch, 0) is batch


def test_a_mixed_run_trains_the_classifier_and_previews_its_first_batch(
    train_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bool, int]] = []
    original = ImageDataModule.on_after_batch_transfer

    def spy(self: ImageDataModule, batch: tuple, dataloader_idx: int) -> tuple:
        out = original(self, batch, dataloader_idx)
        seen.append((self.trainer.training, len(out)))
        return out

    monkeypatch.setattr(ImageDataModule, "on_after_batch_transfer", spy)
    cfg = train_config(
        "augment=cutmix",
        "augment.mixup_alpha=0.2",
        "augment.random_erasing=0.25",
        "model.label_smoothing=0.1",
        "finetune=full",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "test=false",
    )
    metrics = run(cfg)

    assert math.isfinite(metrics["train/loss_epoch"]) and "val/acc" in metrics
    assert {(True, 3), (False, 2)} == set(seen)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    assert "train/batch_preview" in events.Tags()["images"]
    (preview,) = events.Images("train/batch_preview")
    assert preview.step == 0 and preview.width == 8 * CELL + 9 * PAD


# ---------------------------------------------------------------- normalisation


class InMemory:
    """A source of colour images whose channels have very different statistics."""

    def prepare(self) -> None:
        pass

    def load(self) -> Splits:
        generator = torch.Generator().manual_seed(0)
        red = torch.randint(0, 60, (40, 1, 8, 8), generator=generator)
        green = torch.randint(120, 256, (40, 1, 8, 8), generator=generator)
        blue = torch.full((40, 1, 8, 8), 200) + torch.randint(0, 3, (40, 1, 8, 8))
        images = torch.cat([red, green, blue], 1).to(torch.uint8)
        imageset = ImageSet(images, torch.arange(40) % 2, ["a", "b"])
        return Splits(train=imageset, test=imageset)


def tinted_folder(root: Path) -> ImageFolder:
    """Square 12 x 12 photos (so that data.image_size=12 crops nothing off them)."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8) + np.uint8([0, 150, 190])
            Image.fromarray(pixels, "RGB").save(root / name / f"{i}.png")
    return ImageFolder(root)


@pytest.mark.parametrize("kind", ["in_memory", "files"])
def test_dataset_normalisation_gives_zero_mean_unit_std(tmp_path: Path, kind: str) -> None:
    # The in-memory images keep their own size (8); files need theirs given.
    source, size = (InMemory(), None) if kind == "in_memory" else (tinted_folder(tmp_path), 12)
    dm = make_datamodule(
        source, None, MEAN, STD, image_size=size, normalize="dataset", batch_size=64
    )
    dm.setup()
    images = torch.cat([batch[0] for batch in dm.train_dataloader()])
    assert images.shape[1:] == (3, size or 8, size or 8)
    per_channel = images.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.std(1, correction=0) - 1).abs().max() < 1e-3
    used = dm.preprocessing
    assert list(used.mean) != MEAN and len(used.mean) == len(used.std) == 3
    assert dm.backbone_mean == MEAN and dm.backbone_std == STD
    backbone = make_datamodule(source, None, MEAN, STD, image_size=size, batch_size=64)
    backbone.setup()
    assert list(backbone.preprocessing.mean) == MEAN and list(backbone.preprocessing.std) == STD
    images = torch.cat([batch[0] for batch in backbone.train_dataloader()])
    assert images.transpose(0, 1).reshape(3, -1).mean(1).abs().max() > 0.5


# ---------------------------------------------------------------- pictures of a batch


def test_show_batch_writes_a_captioned_grid(fmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pictures" / "batch.png"
    show_batch = load_script("show_batch")
    written = show_batch.main(
        [
            *offline_fmnist(fmnist_root),
            "augment=randaugment",
            "augment.cutmix_alpha=1.0",
            f"out={out}",
            "n=10",
            "columns=4",
        ]
    )
    assert written == out
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (4 * CELL + 5 * PAD, 3 * (CELL + CAPTION) + 4 * PAD)
    with pytest.raises(ValueError, match="n must be a positive integer, got 'ten'"):
        show_batch.main([*offline_fmnist(fmnist_root), "n=ten"])


def test_batch_grid_undoes_the_normalisation() -> None:
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 1.0], [0.2, 0.2, 0.2]])
    pictures = colours.view(3, 3, 1, 1).expand(3, 3, 20, 40)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    grid = batch_grid((pictures - mean) / std, torch.tensor([0, 1, 0]), ["x", "y"], MEAN, STD)
    tile_height = CELL // 2  # the aspect kept: 40 x 20 shown 96 x 48
    assert grid.size == (3 * CELL + 4 * PAD, tile_height + CAPTION + 2 * PAD)
    for i, colour in enumerate(colours):
        pixel = grid.getpixel((PAD + i * (CELL + PAD) + CELL // 2, PAD + tile_height // 2))
        assert pixel == tuple(round(255 * c) for c in colour.tolist())
