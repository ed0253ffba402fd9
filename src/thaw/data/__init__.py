"""Image sources, splits, augmentation and the LightningDataModule that ties them together."""

from thaw.data.datamodule import ImageDataModule
from thaw.data.sources.base import ImageSet, Source, Splits
from thaw.data.sources.download import ChecksumError, DataUnavailableError

__all__ = [
    "ChecksumError",
    "DataUnavailableError",
    "ImageDataModule",
    "ImageSet",
    "Source",
    "Splits",
]
