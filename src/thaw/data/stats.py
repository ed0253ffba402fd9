"""Per-channel mean and std of a training set, for `data.normalize=dataset`: the statistics to use
when the images look nothing like the backbone's pretraining data (or there is no pretraining)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torchvision.transforms.v2 import functional as F

from thaw.data.base import ImageSet
from thaw.data.images import load_image, map_files

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
        raise ValueError("cannot compute image statistics of an empty training set")
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
