"""Image sources, splits, transforms and the LightningDataModule that ties them together."""

from thaw.data.base import ImageSet, Source, Splits
from thaw.data.datamodule import ImageDataModule
from thaw.data.download import ChecksumError, DataUnavailableError

__all__ = [
    "ChecksumError",
    "DataUnavailableError",
    "ImageDataModule",
    "ImageSet",
    "Source",
    "Splits",
]
