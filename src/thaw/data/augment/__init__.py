"""Training augmentation: the options, the per-image pipeline, the batched device pipeline and
batch mixing (MixUp, CutMix)."""

from thaw.data.augment.options import AugmentOptions

__all__ = ["AugmentOptions"]
