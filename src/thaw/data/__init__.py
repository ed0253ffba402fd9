"""Image sources, splits, augmentation and the LightningDataModule that ties them together.

Only the light names are exported here, so that inference, which decodes images with
thaw.data.images, does not load the training DataModule.
"""

from thaw.data.sources.base import ImageSet, Source, Splits
from thaw.data.sources.download import ChecksumError, DataUnavailableError

__all__ = ["ChecksumError", "DataUnavailableError", "ImageSet", "Source", "Splits"]
