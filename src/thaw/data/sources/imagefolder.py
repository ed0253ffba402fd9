"""A folder of class folders: the way users bring their own images.

    root/[train/]<class>/<any/depth>/<image>     class names = sorted folder names
    root/val/<class>/...   root/test/<class>/... optional, same class folders as train

Images stay on disk as a list of paths and are decoded one at a time by the Dataset; the
DataModule splits off the validation and test sets that have no folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from thaw.data.sources.base import ImageSet, Splits
from thaw.data.sources.download import DataUnavailableError
from thaw.errors import UserError

log = logging.getLogger(__name__)

# What cameras, scanners and web shops write and Pillow reads; any other file is not an image.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    | {".ppm", ".pgm", ".pbm", ".pnm"}
)


class ImageFolder:
    """Images in class folders, optionally split into train/, val/ and test/ folders.

    A split without a folder is None in the returned Splits; the DataModule then splits it off the
    training images, stratified and seeded (data.val_fraction, data.test_fraction).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def prepare(self) -> None:
        """Nothing to download; fail early when the folder is not there."""
        if not self.root.is_dir():
            raise DataUnavailableError(
                f"image folder {self.root} does not exist: place one folder of images per class in "
                f"{self.root} (or in {self.root}/train, with optional val/ and test/ beside it)"
            )

    def load(self) -> Splits:
        self.prepare()
        train_dir = self.root / "train"
        if not train_dir.is_dir():
            stray = [name for name in ("val", "test") if (self.root / name).is_dir()]
            if stray:
                raise UserError(
                    f"{self.root} has {'/ and '.join(stray)}/ but no train/ folder; put the "
                    "training class folders in train/"
                )
            train_dir = self.root
        classes = _class_folders(train_dir)
        if not classes:
            raise UserError(f"{train_dir} has no class folders (one folder of images per class)")
        train = _scan(train_dir, classes)
        empty = [name for name in classes if not (train.labels == classes.index(name)).any()]
        if empty:
            raise UserError(f"class folders without images in {train_dir}: {empty}")
        val = _scan_split(self.root / "val", classes, train_dir)
        test = _scan_split(self.root / "test", classes, train_dir)
        return Splits(train=train, test=test, val=val)

    def load_test(self) -> ImageSet | None:
        """The test/ folder alone (None without one: the test set is then split off train)."""
        self.prepare()
        test_dir = self.root / "test"
        if not test_dir.is_dir():
            return None
        return _scan(test_dir, _class_folders(test_dir))


def _class_folders(directory: Path) -> list[str]:
    entries = directory.iterdir()
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _scan(directory: Path, classes: list[str]) -> ImageSet:
    """Every image file under each class folder, sorted (see image_files)."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = image_files(directory / name)
        paths += files
        labels += [label] * len(files)
    return ImageSet(paths, torch.tensor(labels, dtype=torch.long), classes)


def image_files(class_dir: Path) -> list[Path]:
    """The image files under `class_dir` at any depth, sorted, hidden files and folders skipped.
    Symlinked folders are followed (photos are often linked in from elsewhere), each real folder
    once: a link to a folder already read, such as a loop back up, is skipped and named, as is a
    broken link, so no image goes missing without a word."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for top, folders, files in os.walk(class_dir, followlinks=True):
        stat = os.stat(top)
        if (stat.st_dev, stat.st_ino) in seen:
            log.warning("Skipped %s: it links to a folder already read (a loop or a copy)", top)
            folders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in files:
            path = Path(top) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.is_file():
                found.append(path)
            else:
                log.warning("Skipped %s: a link to a file that does not exist", path)
    return sorted(found)


def read_image_list(path: Path) -> list[Path]:
    """The paths a .txt list names, one per line (blank lines skipped), relative ones from the
    list's folder. A listed file that is missing stays: whoever reads it says so."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [path.parent / Path(line).expanduser() for line in lines if line]


def _scan_split(directory: Path, classes: list[str], train_dir: Path) -> ImageSet | None:
    """The val/ or test/ folder if there is one; its class folders must be train's."""
    if not directory.is_dir():
        return None
    found = _class_folders(directory)
    if found != classes:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise UserError(
            f"class folders in {directory} differ from {train_dir}: "
            f"missing {missing}, not in train {extra}"
        )
    return _scan(directory, classes)
