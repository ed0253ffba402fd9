"""A run's Preprocessing, resolved once from its training images: the input size, whether the
images are gray, and the normalisation statistics: the backbone's, or with `data.normalize=dataset`
the training split's per-channel mean and std (for images that look nothing like the backbone's
pretraining data, or no pretraining at all)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torchvision.transforms.v2 import functional as F

from thaw.data.images import load_image, map_files
from thaw.data.sources.base import ImageSet
from thaw.errors import UserError
from thaw.preprocess import Preprocessing

NORMALIZE = ("backbone", "dataset")

MAX_FILES = 500
_CHUNK = 1024


def channel_stats(batches: Iterable[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Mean and std of every RGB channel, in [0, 1] units, over all pixels of uint8 images given
    as (C, H, W) or (N, C, H, W) tensors of any sizes; one channel counts as gray (R = G = B)."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for batch in batches:
        pixels = batch.movedim(-3, 0).reshape(batch.shape[-3], -1).to(torch.float64) / 255.0
        total += pixels.sum(1)
        squares += pixels.square().sum(1)
        count += pixels.shape[1]
    if count == 0:
        raise UserError("cannot compute image statistics of an empty training set")
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


def dataset_stats(
    images: ImageSet, seed: int, min_size: int | None = None
) -> tuple[list[float], list[float]]:
    """`channel_stats` of an ImageSet: every image of an in-memory set; a seeded sample of at most
    MAX_FILES files of a file-based one (decoding thousands of photos would delay every run)."""
    if images.in_memory:
        return channel_stats(images.images.split(_CHUNK))
    paths = images.images
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(paths), generator=generator)[:MAX_FILES].sort().values
    sample = [paths[i] for i in chosen.tolist()]
    return channel_stats(map_files(lambda p: F.pil_to_tensor(load_image(p, min_size)), sample))


def resolve_preprocessing(
    train: ImageSet,
    image_size: int | None,
    normalize: str,
    backbone_mean: Sequence[float],
    backbone_std: Sequence[float],
    seed: int,
) -> Preprocessing:
    """The Preprocessing of a run on `train`: `image_size`, or the images' own square size
    (null); gray when the images have one channel; the backbone's statistics or, with
    `normalize="dataset"`, those of `train` (`normalize` is one of NORMALIZE, checked with the
    data config)."""
    if image_size is None:
        image_size = _native_size(train)
    mean, std = backbone_mean, backbone_std
    if normalize == "dataset":
        mean, std = dataset_stats(train, seed, image_size)
    grayscale = train.in_memory and train.images.shape[1] == 1  # type: ignore[union-attr]
    return Preprocessing(input_size=image_size, mean=mean, std=std, grayscale=grayscale)


def _native_size(images: ImageSet) -> int:
    """The side of square in-memory images: what `data.image_size=null` keeps."""
    if images.in_files:
        raise UserError(
            "data.image_size=null keeps the images' own size, but image files differ in size: "
            "set data.image_size (e.g. 224)"
        )
    height, width = images.images.shape[-2:]  # type: ignore[union-attr]
    if height != width:
        raise UserError(
            f"data.image_size=null keeps the images' own size, but they are {height}x{width}, "
            "not square: set data.image_size"
        )
    return int(height)
