"""Per-image transforms (torchvision.transforms.v2) from the `augment` config group.

Both pipelines take a uint8 CHW tensor or a PIL image and return a float32 CHW tensor with 3
channels, normalised with the given statistics (the backbone's or the dataset's); augmentation runs
on uint8, before the conversion, where it is cheapest. Evaluation never augments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from thaw.data.augment import AugmentOptions


class ToRGB(torch.nn.Module):
    """Repeat a single (grayscale) channel three times, so every backbone sees RGB input."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        channels = image.shape[-3]
        if channels == 3:
            return image
        if channels != 1:
            raise ValueError(f"expected an image with 1 or 3 channels, got {channels}")
        return F.to_image(image.repeat_interleave(3, dim=-3))


class RandomPadCrop(torch.nn.Module):
    """Zero-pad each side by `fraction` of its length, then crop a random window of the original
    size: the CIFAR-style shift, for any input size (0.125 gives 4 pixels on 32)."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        pad_h, pad_w = round(self.fraction * height), round(self.fraction * width)
        padded = F.pad(image, [pad_w, pad_h, pad_w, pad_h])
        top = int(torch.randint(0, 2 * pad_h + 1, ()))
        left = int(torch.randint(0, 2 * pad_w + 1, ()))
        return F.crop(padded, top, left, height, width)


def build_train_transform(
    augment: AugmentOptions | Mapping[str, Any] | None,
    image_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> v2.Compose:
    """Resize as for evaluation, then the per-image augmentations `augment` switches on (see
    AugmentOptions), in the order crop, flip, policy, colour jitter; random erasing comes last, on
    the normalised tensor, so erased pixels hold the mean colour."""
    options = AugmentOptions.parse(augment)
    steps: list[torch.nn.Module] = []
    if options.crop_padding > 0:
        steps.append(RandomPadCrop(options.crop_padding))
    if options.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(options.hflip))
    if options.policy != "none":
        steps.append(_policy(options))
    strength = options.color_jitter
    if strength > 0:
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    after = [v2.RandomErasing(options.random_erasing)] if options.random_erasing > 0 else []
    return _pipeline(image_size, mean, std, steps, after)


def build_eval_transform(
    image_size: int | None, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """Deterministic: RGB, resize, normalise."""
    return _pipeline(image_size, mean, std)


def _pipeline(
    image_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    augmentations: Sequence[torch.nn.Module] = (),
    after_normalize: Sequence[torch.nn.Module] = (),
) -> v2.Compose:
    mean, std = _stats(mean, "mean"), _stats(std, "std")
    steps: list[torch.nn.Module] = [v2.ToImage(), ToRGB()]
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer or null, got {image_size!r}")
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    steps += [*augmentations, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose([*steps, *after_normalize, v2.ToPureTensor()])


def _policy(options: AugmentOptions) -> torch.nn.Module:
    """The automatic augmentation policy: RandAugment, TrivialAugment or AutoAugment."""
    if options.policy == "randaugment":
        return v2.RandAugment(num_ops=options.num_ops, magnitude=options.magnitude)
    if options.policy == "trivialaugment":
        return v2.TrivialAugmentWide()
    return v2.AutoAugment(v2.AutoAugmentPolicy(options.autoaugment_policy))


def _stats(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {values}")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive, got {values}")
    return values
