"""What every data source returns, so the DataModule never cares where images came from, and the
shared base of the sources that come as one downloadable archive."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from thaw.data.sources.download import archive_path, fetch_and_extract

if TYPE_CHECKING:
    from thaw.data.sources.streaming import Shards

# A data set's splits, by name, in order.
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageSet:
    """Labelled images: a uint8 tensor (N, C, H, W) held in memory, a list of image files, or a
    split's litdata shards (thaw.data.sources.streaming.Shards: (3, S, S) uint8 images by index).

    `classes[i]` is the name of label i; C is 1 (grayscale) or 3 (RGB). `labels` are class
    indices (N,), or for multi-label data multi-hot rows (N, classes). `ids` number the
    images (by default 0..N-1; the DataModule numbers them across the source's sets, see
    thaw.data.corrections.number_images): a file has its path, but an in-memory image only that
    number, which every subset and filter carries along, so a review list can name it
    (`data.exclude`, label_issues.csv's `index`).
    """

    images: torch.Tensor | list[Path] | Shards
    labels: torch.Tensor
    classes: list[str]
    ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.ids is None:
            object.__setattr__(self, "ids", torch.arange(len(self.labels)))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multilabel(self) -> bool:
        """Labels are sets: `labels` is a multi-hot (N, classes) float tensor, not (N,) indices."""
        return self.labels.ndim == 2

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, torch.Tensor)

    @property
    def in_files(self) -> bool:
        return isinstance(self.images, list)

    @property
    def streamed(self) -> bool:
        """Shards, read by index or streamed (data=streaming)."""
        return not (self.in_memory or self.in_files)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at `indices`, same classes."""
        if self.in_memory:
            images = self.images[indices]
        elif self.in_files:
            images = [self.images[i] for i in indices.tolist()]
        else:
            images = self.images.subset(indices)  # type: ignore[union-attr]
        return ImageSet(images, self.labels[indices], self.classes, self.ids[indices.cpu()])


@dataclass(frozen=True)
class Splits:
    """What a source provides: its training set and, where it has them, its official test and
    validation sets (the DataModule splits a missing one off `train`); once planned, perhaps an
    `unlabeled` pool too, whose labels training never sees (data.unlabeled_per_class)."""

    train: ImageSet
    test: ImageSet | None = None
    val: ImageSet | None = None
    unlabeled: ImageSet | None = None


class Source(Protocol):
    """What the DataModule needs from a source: `prepare` puts the data on disk (downloading if it
    may; run once, on one process), `load` reads every split, and `load_test` reads only the test
    set where the source has one of its own (None: it is split off the training images), so a
    trained model can be evaluated where only its test images exist."""

    def prepare(self) -> None: ...

    def load(self) -> Splits: ...

    def load_test(self) -> ImageSet | None: ...


class ArchiveSource:
    """A data set published as one archive (tar or zip) whose top-level folder is `FOLDER`.

    Looks for `root/FOLDER`; failing that extracts the archive from `root`, downloading it from
    `url` (default: the publisher's) first when `download` is true. `md5` is the archive's
    expected md5: "published" (the publisher's sum), another sum, or None to skip the check (for
    a mirror that repacks the archive).
    """

    NAME: ClassVar[str]  # for messages: "CIFAR-10"
    FOLDER: ClassVar[str]
    URL: ClassVar[str]
    MD5: ClassVar[str]

    def __init__(
        self,
        root: str | Path,
        download: bool = True,
        url: str | None = None,
        md5: str | None = "published",
    ) -> None:
        self.root = Path(root)
        self.download = download
        self.url = url or self.URL
        self.md5 = self.MD5 if md5 == "published" else md5

    @property
    def folder(self) -> Path:
        return self.root / self.FOLDER

    def extract(self) -> Path:
        """Make sure `root/FOLDER` exists: extract the archive, fetched first if needed."""
        archive = archive_path(self.root, self.url, Path(self.URL).name)
        return fetch_and_extract(self.NAME, self.folder, archive, self.url, self.md5, self.download)

    def prepare(self) -> None:
        self.extract()
