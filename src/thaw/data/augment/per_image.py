"""The per-image training transform (torchvision.transforms.v2) from the `augment` config group.

It is the run's Preprocessing transform with augmentations inserted: it takes a uint8 CHW tensor
or a PIL image and returns a float32 CHW tensor with 3 channels; augmentation runs on uint8,
before the conversion, where it is cheapest. Evaluation never augments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from thaw.data.augment.options import ERASE_RATIO, ERASE_SCALE, AugmentOptions
from thaw.preprocess import Preprocessing


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
    augment: AugmentOptions | Mapping[str, Any] | None, preprocessing: Preprocessing
) -> v2.Compose:
    """`preprocessing`'s transform with the per-image augmentations `augment` switches on (see
    AugmentOptions) after its crop, in the order crop, flip, policy, colour jitter; random erasing
    comes last, on the normalised tensor, so erased pixels hold the mean colour."""
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
    after = []
    if options.random_erasing > 0:
        after.append(v2.RandomErasing(options.random_erasing, ERASE_SCALE, ERASE_RATIO))
    return preprocessing.transform(steps, after)


def _policy(options: AugmentOptions) -> torch.nn.Module:
    """The automatic augmentation policy: RandAugment, TrivialAugment or AutoAugment."""
    if options.policy == "randaugment":
        return v2.RandAugment(num_ops=options.num_ops, magnitude=options.magnitude)
    if options.policy == "trivialaugment":
        return v2.TrivialAugmentWide()
    return v2.AutoAugment(v2.AutoAugmentPolicy(options.autoaugment_policy))
