"""RandAugment on whole uint8 batches, every sample drawing its own operations.

The operations, their magnitudes and their code are torchvision's own (v2.RandAugment): each
group of samples that drew the same operation and sign goes through torchvision's op at once.
Only the draws differ from the per-image transform: they come from the generator passed in, per
sample, so a batch reproduces from its seed alone.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


class BatchRandAugment:
    """v2.RandAugment(num_ops, magnitude) for a (B, C, H, W) uint8 batch: `num_ops` times, each
    sample picks one of the 14 operations uniformly and, for a signed one, a sign at even odds."""

    def __init__(self, num_ops: int, magnitude: int) -> None:
        self.policy = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        self.operations = list(self.policy._AUGMENTATION_SPACE.items())

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, height, width = images.shape
        images = images.clone()
        draw = {"generator": generator, "device": images.device}
        policy = self.policy
        for _ in range(policy.num_ops):
            chosen = torch.randint(len(self.operations), (batch,), **draw)
            negative = torch.rand(batch, **draw) <= 0.5  # torchvision's odds for the sign
            for number, (name, (magnitudes_of, signed)) in enumerate(self.operations):
                if name == "Identity":
                    continue
                magnitudes = magnitudes_of(policy.num_magnitude_bins, height, width)
                magnitude = 0.0 if magnitudes is None else float(magnitudes[policy.magnitude])
                for sign in (1.0, -1.0) if signed else (1.0,):
                    picked = chosen == number
                    if signed:
                        picked &= negative == (sign < 0)
                    rows = picked.nonzero().flatten()
                    if len(rows) == 0:
                        continue
                    images[rows] = policy._apply_image_or_video_transform(
                        images[rows], name, sign * magnitude, policy.interpolation, policy._fill
                    )
        return images
