"""Preprocessing: how a trained model must see an image, as one value saved in its checkpoint.

Exported models that disagree with PyTorch nearly always disagree because their preprocessing
was rebuilt from memory. Here it is resolved once per run (dataset statistics included), stored
beside the class names, and every consumer (evaluation, prediction, export, serving) builds its
transform from the stored value, never from config keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from thaw.records import from_plain_values

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Preprocessing:
    """Decoded image (uint8, 1 or 3 channels, or a PIL image) -> the float tensor the model eats.

    In order: RGB conversion (a single channel is repeated three times; with `grayscale`, the
    model was trained on gray images, so colour inputs become gray first), a bilinear antialiased
    resize of the shorter side to `resize_size`, a centre crop of `input_size` x `input_size`,
    scaling to [0, 1], then normalisation with `mean` and `std` per RGB channel.

    What is done to the model's output (the temperature) is thaw.postprocess's Postprocessing.
    """

    input_size: int
    mean: Triple
    std: Triple
    resize_size: int | None = None  # None: the input size (the crop keeps the whole short side)
    grayscale: bool = False

    def __post_init__(self) -> None:
        for name in ("input_size", "resize_size"):
            value = getattr(self, name)
            if name == "resize_size" and value is None:
                object.__setattr__(self, name, self.input_size)
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"preprocessing {name} must be a positive integer, got {value!r}")
        if self.resize_size < self.input_size:
            raise ValueError(
                f"preprocessing resize_size={self.resize_size} is smaller than the crop "
                f"input_size={self.input_size}"
            )
        object.__setattr__(self, "mean", _channel_values("mean", self.mean))
        object.__setattr__(self, "std", _channel_values("std", self.std))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (ints, floats, lists), safe for `torch.load(weights_only=True)` and JSON."""
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        return from_plain_values(cls, values, "preprocessing")

    def transform(
        self,
        augmentations: Sequence[torch.nn.Module] = (),
        after_normalize: Sequence[torch.nn.Module] = (),
        normalize: bool = True,
    ) -> v2.Compose:
        """The evaluation transform; training inserts its `augmentations` on the uint8 image
        after the crop (where they are cheapest) and `after_normalize` ones at the end. With
        `normalize=False` it stops at the uint8 RGB crop, for a model that normalises in its
        graph."""
        steps = [
            v2.ToImage(),
            ToRGB(self.grayscale),
            v2.Resize(self.resize_size, antialias=True),
            v2.CenterCrop(self.input_size),
            *augmentations,
        ]
        if normalize:
            steps += [
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
                *after_normalize,
            ]
        return v2.Compose([*steps, v2.ToPureTensor()])


class ToRGB(torch.nn.Module):
    """Three channels for every backbone: a single channel is repeated; with `grayscale`, a
    colour image is first turned gray, as the model's training images were."""

    def __init__(self, grayscale: bool = False) -> None:
        super().__init__()
        self.grayscale = grayscale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        channels = image.shape[-3]
        if channels == 3:
            return F.rgb_to_grayscale(image, 3) if self.grayscale else image
        if channels != 1:
            raise ValueError(f"expected an image with 1 or 3 channels, got {channels}")
        return F.to_image(image.repeat_interleave(3, dim=-3))


def _channel_values(name: str, values: Sequence[float]) -> Triple:
    floats = tuple(float(v) for v in values)
    if len(floats) != 3:
        raise ValueError(f"preprocessing {name} must have 3 values (R, G, B), got {list(values)}")
    if name == "std" and min(floats) <= 0:
        raise ValueError(f"preprocessing std must be positive, got {list(floats)}")
    return floats  # type: ignore[return-value]
