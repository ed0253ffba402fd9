"""MixUp and CutMix: batch-level augmentations that blend images and, in proportion, their labels.

They run on whole batches on the training device (the DataModule's on_after_batch_transfer), and
produce the (images, labels, soft_targets) batches the Classifier knows: the loss is taken on the
soft targets, accuracy on the unchanged hard labels.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchvision.transforms import v2

from thaw.data.augment.options import AugmentOptions


class BatchMix:
    """Mix a batch with probability `options.mix_prob`: MixUp, CutMix, or one of them chosen at
    random per batch when both alphas are set. A batch left unmixed gets one-hot soft targets, so
    every training batch has the same structure."""

    def __init__(self, options: AugmentOptions, num_classes: int) -> None:
        if not options.mixes_batches:
            raise ValueError("BatchMix needs augment.mixup_alpha or augment.cutmix_alpha > 0")
        mixes: list[torch.nn.Module] = []
        if options.mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=options.mixup_alpha))
        if options.cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=options.cutmix_alpha))
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        self.prob = options.mix_prob
        self.num_classes = num_classes

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mixed images, the hard labels unchanged, soft targets (N, C) whose rows sum to 1).
        Multi-hot labels (N, C) are mixed as they are: an image's targets become the mix of
        both images' label sets, each label in proportion to its image's share."""
        hard = labels if labels.ndim == 2 else F.one_hot(labels, self.num_classes)
        if float(torch.rand(())) < self.prob:
            mixed, soft = self.mix(images, hard.float())
        else:
            mixed, soft = images, hard.float()
        return mixed, labels, soft
