"""data.cache: image files decoded once into uint8 at the training size, reused while they are
unchanged, read by the device path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_formats import write_image_folder
from datamodules import make_datamodule
from thaw.config import compose_config
from thaw.data.images import ImageDecodeError
from thaw.data.sources.imagefolder import ImageFolder
from thaw.errors import UserError

MEAN = STD = [0.5, 0.5, 0.5]


def folder_datamodule(root: Path, **values):
    datamodule = make_datamodule(ImageFolder(root), None, MEAN, STD, **values)
    datamodule.setup()
    return datamodule


def batches(loader) -> torch.Tensor:
    return torch.cat([images for images, _ in loader])


def test_the_cache_holds_the_decoded_pixels_and_feeds_the_device_path(tmp_path):
    """PNGs at the training size: bitwise the files' pixels. JPEGs of another size, resized: the
    per-image path's pixels exactly (tolerance 0: the same decode, resize and crop kernels)."""
    pngs = write_image_folder(tmp_path / "png", ["a", "b"], 6, ("train", "test"), size=(16, 16))
    cached = folder_datamodule(pngs, image_size=16, cache=str(tmp_path / "cache"))
    assert cached.loader == "device" and cached.pixels["test"].in_memory
    for row, path in enumerate(cached.test_set.images):
        decoded = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(cached.pixels["test"].images[row].numpy(), decoded), path

    jpegs = write_image_folder(
        tmp_path / "jpg", ["a", "b"], 6, ("train", "test"), size=(50, 37), suffix=".jpg"
    )
    per_image = folder_datamodule(jpegs, image_size=24)
    cached = folder_datamodule(jpegs, image_size=24, cache=str(tmp_path / "cache"))
    assert (per_image.loader, cached.loader) == ("dataloader", "device")
    for split in ("train", "test"):
        assert cached.pixels[split].images.shape[1:] == (3, 24, 24)
        plain, fast = per_image.plain_loader(split), cached.plain_loader(split)
        assert torch.equal(batches(plain), batches(fast)), split
    assert [str(p) for p in cached.test_set.images] == [str(p) for p in per_image.test_set.images]


def test_an_unchanged_folder_reuses_the_cache_and_a_changed_file_or_size_rebuilds_it(
    tmp_path, caplog
):
    root = write_image_folder(tmp_path / "photos", ["a", "b"], 5, ("train", "test"), (20, 20))
    cache = str(tmp_path / "cache")

    def built(**values) -> tuple[list[str], object]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="thaw.data.cache"):
            datamodule = folder_datamodule(root, cache=cache, **values)
        messages = [r.getMessage() for r in caplog.records]
        return [m for m in messages if "test split" in m], datamodule

    first, _ = built(image_size=20)
    assert "building" in first[0] and first[0].endswith("no cache yet")
    again, _ = built(image_size=20)
    assert "reusing" in again[0], again

    changed = root / "test" / "b" / "img_2.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt, datamodule = built(image_size=20)
    assert "building" in rebuilt[0] and f"1 files changed (e.g. {changed.resolve()})" in rebuilt[0]
    row = [Path(p) for p in datamodule.test_set.images].index(changed)
    assert datamodule.pixels["test"].images[row].flatten(1).unique(dim=1).tolist() == [
        [255],
        [0],
        [0],
    ]

    resized, datamodule = built(image_size=12)
    assert "the resize settings changed (side 20 -> 12)" in resized[0]
    assert datamodule.pixels["test"].images.shape[1:] == (3, 12, 12)


def test_a_corrupt_file_in_a_cached_folder_is_named_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "photos", ["a", "b"], 5, ("train", "test"), (20, 20))
    bad = root / "test" / "a" / "img_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cache = str(tmp_path / "cache")
    with pytest.raises(ImageDecodeError, match=str(bad)):
        folder_datamodule(root, image_size=20, cache=cache)
    skipped = folder_datamodule(root, image_size=20, cache=cache, skip_bad_images=True)
    assert skipped.skipped_images == [bad]
    assert len(skipped.pixels["test"]) == len(skipped.test_set) == 9


def test_a_cache_larger_than_the_free_disk_is_refused_before_writing(tmp_path):
    root = write_image_folder(tmp_path / "photos", ["a", "b"], 3, ("train", "test"), (20, 20))
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"needs [\d.]+ GB .* at 300000 px.* GB free"):
        folder_datamodule(root, image_size=300_000, cache=str(cache))
    assert not any(cache.glob("*.npy")) and not any(cache.glob(".*.npy"))


def test_data_cache_true_is_a_folder_beside_the_logs_and_a_bad_value_is_refused(tmp_path):
    from hydra.utils import instantiate

    overrides = ["data=imagefolder", f"data.root={tmp_path}", "data.cache=true"]
    cfg = compose_config("train", overrides, tmp_path / "run")
    settings = instantiate(cfg.data)
    assert settings.cache_folder == Path(cfg.paths.log_dir) / "cache"
    cfg = compose_config("train", [*overrides[:2], f"data.cache={tmp_path}/mine"], tmp_path / "r")
    assert instantiate(cfg.data).cache_folder == tmp_path / "mine"
    for value in ("3", "''"):
        cfg = compose_config("train", [*overrides[:2], f"data.cache={value}"], tmp_path / "r")
        with pytest.raises(UserError, match="data.cache must be a folder"):
            instantiate(cfg.data, _partial_=True)()
