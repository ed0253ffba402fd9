"""Augmentation of whole uint8 batches on the device they live on: the fast alternative to the
per-image pipeline of thaw.data.augment.per_image, with no loader workers and no per-image Python.

It draws the same distribution of images as `build_train_transform` (and gives exactly what
`Preprocessing.transform` gives), except that colour jitter stays in float where the per-image path
truncates to uint8 after each adjustment. Of the automatic policies, RandAugment runs on batches
(thaw.data.augment.batch_policy); TrivialAugment and AutoAugment exist only per image. Every
draw is per sample and comes from the generator passed in, so a batch is reproducible from its
seed alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms.v2 import functional as F

from thaw.data.augment.batch_policy import BatchRandAugment
from thaw.data.augment.options import ERASE_RATIO, ERASE_SCALE, AugmentOptions
from thaw.errors import UserError
from thaw.preprocess import Preprocessing

# The augmentations that only exist per image.
_PER_IMAGE_KEYS = ("policy=trivialaugment", "policy=autoaugment")
# The float work of a batch on a CPU, this many bytes of it at a time (a few 224-px images, or 80
# of 64 px): it stays in the processor's cache between passes.
_CPU_CHUNK_BYTES = 4 * 2**20
# RandomErasing's tries at a rectangle that fits before it leaves the image be (torchvision's).
ERASE_ATTEMPTS = 10


def unsupported(options: AugmentOptions | Mapping[str, Any] | None) -> list[str]:
    """'key=value' for each augmentation in `options` that only the per-image path can do; empty
    when the batch path can. MixUp/CutMix are not listed: they run on batches on either path."""
    keys = AugmentOptions.parse(options).random_keys
    return [key for key in keys if key in _PER_IMAGE_KEYS]


def check_batchable(options: AugmentOptions | Mapping[str, Any] | None) -> None:
    """Raise, naming the keys and the fix, when `options` holds per-image-only augmentations."""
    if keys := unsupported(options):
        raise UserError(
            f"augment {', '.join(keys)} only runs per image, not on batches: switch it off "
            "or use data.loader=dataloader (the per-image path)"
        )


def jitter_colors(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness, adjust_contrast and adjust_saturation on float images in
    [0, 1] (B, 3, H, W), with per-sample `factors` (B, 3) in that order, applied in each sample's
    own `order` (B, 3: a permutation of 0, 1, 2). Each adjustment is a clamped blend with a target
    (zero, the grayscale mean, the grayscale image), so one blend per position does all three.
    On a CPU, where looking costs no device sync, a position where every sample adjusts the
    brightness (a target of zero) skips the grayscale image."""
    on_cpu = images.device.type == "cpu"
    for position in range(3):
        op = order[:, position].view(-1, 1, 1, 1)
        factor = factors.gather(1, order[:, position : position + 1]).view(-1, 1, 1, 1)
        target = None
        if not on_cpu or bool(op.any()):
            red, green, blue = images.unbind(1)
            gray = red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(1)
            contrast_target = torch.where(op == 1, gray.mean((-2, -1), keepdim=True), 0.0)
            target = torch.where(op == 2, gray, contrast_target).mul_(1 - factor)
        # The first blend writes a new tensor (the input may be a view), later ones their own.
        scaled = images.mul(factor) if position == 0 else images.mul_(factor)
        images = (scaled if target is None else scaled.add_(target)).clamp_(0, 1)
    return images


def erase_rectangles(
    images: torch.Tensor, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """torchvision's RandomErasing(probability) with value 0 for a normalised batch, drawn per
    sample: all its attempts at once, each sample taking its first rectangle that fits."""
    batch, _, height, width = images.shape
    draw = {"generator": generator, "device": images.device}
    low, high = ERASE_SCALE
    area = height * width * (torch.rand(batch, ERASE_ATTEMPTS, **draw) * (high - low) + low)
    log_low, log_high = (math.log(bound) for bound in ERASE_RATIO)
    aspect = torch.exp(torch.rand(batch, ERASE_ATTEMPTS, **draw) * (log_high - log_low) + log_low)
    heights, widths = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (heights < height) & (widths < width)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first fitting attempt
    rect_h, rect_w = heights.gather(1, first), widths.gather(1, first)
    erase = (torch.rand(batch, 1, **draw) < probability) & fits.any(1, keepdim=True)
    top = (torch.rand(batch, 1, **draw) * (height - rect_h + 1)).floor()
    left = (torch.rand(batch, 1, **draw) * (width - rect_w + 1)).floor()
    rows = torch.arange(height, device=images.device)
    columns = torch.arange(width, device=images.device)
    in_rows = (rows >= top) & (rows < top + rect_h) & erase
    in_columns = (columns >= left) & (columns < left + rect_w)
    return images.masked_fill((in_rows[:, :, None] & in_columns[:, None, :])[:, None], 0.0)


class BatchAugment:
    """`build_train_transform` (train=True) or `Preprocessing.transform` (train=False) for a
    batch: resize and centre crop, then in training the padded random crop, the flip, RandAugment
    and the colour jitter, each drawn per sample, then normalisation, then random erasing."""

    def __init__(
        self,
        options: AugmentOptions | Mapping[str, Any] | None,
        preprocessing: Preprocessing,
        train: bool,
    ) -> None:
        self.options = AugmentOptions.parse(options)
        if train:
            check_batchable(self.options)
        self.preprocessing, self.train = preprocessing, train
        self.mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
        self.std = torch.tensor(preprocessing.std).view(3, 1, 1)
        options = self.options
        self.randaugment = (
            BatchRandAugment(options.num_ops, options.magnitude)
            if options.policy == "randaugment"
            else None
        )

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Float32 (B, 3, S, S), normalised, on the images' device; `generator` (on that device
        too) is required in training and unused otherwise."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape)
            raise ValueError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {shape}")
        if self.train and generator is None:
            raise ValueError("training augmentation draws from a generator: pass one")
        # Resizing uint8 with torchvision's own kernel keeps the result bit-identical to Resize
        # (and leaves images that already have the size untouched).
        images = F.resize(images, [self.preprocessing.resize_size], antialias=True)
        images = F.center_crop(images, [self.preprocessing.input_size])
        options = self.options
        if self.train and (options.crop_padding > 0 or options.hflip > 0):
            images = self._shift_and_flip(images, generator)
        if self.train and self.randaugment is not None:
            images = self.randaugment(images, generator)
        jitter = None
        if self.train and options.color_jitter > 0:
            low, high = max(0.0, 1 - options.color_jitter), 1 + options.color_jitter
            draw = {"generator": generator, "device": images.device}
            factors = torch.rand(images.shape[0], 3, **draw) * (high - low) + low
            order = torch.rand(images.shape[0], 3, **draw).argsort(dim=1)
            jitter = factors, order
        images = self._normalised(images, jitter)
        if self.train and options.random_erasing > 0:
            images = erase_rectangles(images, options.random_erasing, generator)
        return images

    def _normalised(
        self, images: torch.Tensor, jitter: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """Scaled to [0, 1], colour-jittered with the drawn (factors, order), normalised: float
        passes over the whole batch that are bound by memory on a CPU, so there they run a few
        images at a time, while those are still in the processor's cache (the same numbers)."""
        batch, _, height, width = images.shape
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        out = torch.empty(batch, 3, height, width, device=images.device)
        for rows in self._chunks(images):
            part = images[rows].to(torch.float32).mul_(1 / 255).expand(-1, 3, -1, -1)
            if jitter is not None:
                part = jitter_colors(part, jitter[0][rows], jitter[1][rows])
            torch.sub(part, mean, out=out[rows]).div_(std)
        return out

    def _shift_and_flip(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """RandomPadCrop then the flip as one gather: each sample's window of the zero-padded
        batch, its columns reversed where it flips (on a CPU a few images at a time, as in
        `_normalised`)."""
        batch, channels, height, width = images.shape
        pad_h, pad_w = (round(self.options.crop_padding * side) for side in (height, width))
        draw = {"generator": generator, "device": images.device}
        top = torch.randint(2 * pad_h + 1, (batch, 1), **draw)
        left = torch.randint(2 * pad_w + 1, (batch, 1), **draw)
        flip = torch.rand(batch, 1, **draw) < self.options.hflip
        rows = top + torch.arange(height, device=images.device)
        columns = torch.arange(width, device=images.device)
        columns = left + torch.where(flip, columns.flip(0), columns)
        # Into the flattened padded planes: one gather (advanced indexing is slower on CPU).
        index = rows[:, :, None] * (width + 2 * pad_w) + columns[:, None, :]
        index = index.view(batch, 1, height * width)
        out = torch.empty_like(images)
        for part in self._chunks(images):
            planes = torch.nn.functional.pad(images[part], [pad_w, pad_w, pad_h, pad_h])
            taken = planes.flatten(2).gather(2, index[part].expand(-1, channels, -1))
            out[part] = taken.view(-1, channels, height, width)
        return out

    @staticmethod
    def _chunks(images: torch.Tensor) -> list[slice]:
        """The batch in slices of _CPU_CHUNK_BYTES of float pixels on a CPU, whole elsewhere."""
        batch, _, height, width = images.shape
        on_cpu = images.device.type == "cpu"
        step = max(1, _CPU_CHUNK_BYTES // (4 * 3 * height * width)) if on_cpu else max(batch, 1)
        return [slice(start, start + step) for start in range(0, batch, step)]
