"""Tiny ImageNet (tiny-imagenet-200.zip): 200 classes of 64x64 JPEGs, decoded once into a cache.

    tiny-imagenet-200/wnids.txt                 the 200 WordNet ids of the classes
    tiny-imagenet-200/words.txt                 wnid <tab> "name, synonym, ..." (all of WordNet)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG      500 per class
    tiny-imagenet-200/val/images/*.JPEG         10000, labelled by val/val_annotations.txt
                                                (file <tab> wnid <tab> bounding box)
    tiny-imagenet-200/test/images/*.JPEG        unlabelled, so never read

The official val split serves as the test set; the DataModule splits validation off train.
Decoding the 110000 JPEGs takes a while, so `prepare` caches the decoded arrays next to the data
under a key made from the file list with sizes and modification times: a changed, added or
removed file rebuilds it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from thaw.data.images import load_image, map_files
from thaw.data.sources.base import ArchiveSource, ImageSet, Splits
from thaw.errors import UserError

log = logging.getLogger(__name__)

SIZE = 64
# What labels the images, relative to the extracted folder.
LABEL_FILES = ("wnids.txt", "words.txt", "val/val_annotations.txt")
# Part of the cache key: bump it when the decoding or the cached arrays change meaning.
_CACHE_VERSION = "1"
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


class TinyImageNet(ArchiveSource):
    """Tiny ImageNet as uint8 tensors (N, 3, 64, 64): 100000 train and the 10000 official val
    images as the test set; class i is the i-th of the sorted wnids, named by its first name in
    words.txt (names shared by several classes get the wnid appended)."""

    NAME = "Tiny ImageNet"
    FOLDER = "tiny-imagenet-200"
    URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

    def prepare(self) -> None:
        """Extract the archive (fetched if needed) and decode it into the cache: the slow part,
        done once, on one process."""
        self._cache()

    def load(self) -> Splits:
        path = self._cache()
        try:
            with np.load(path, allow_pickle=False) as cached:
                tensors = {name: torch.from_numpy(cached[name]) for name in _ARRAYS}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise OSError(f"cannot read the cache {path} ({err}): delete it to rebuild it") from err
        classes = self._classes()
        return Splits(
            train=ImageSet(tensors["train_images"], tensors["train_labels"], classes),
            test=ImageSet(tensors["test_images"], tensors["test_labels"], classes),
        )

    def load_test(self) -> ImageSet:
        """The official val images, decoded directly (no cache: the training images may be
        absent)."""
        self._extract_complete()
        files, labels = _val_files(self.folder / "val", read_wnids(self.folder / "wnids.txt"))
        images = torch.from_numpy(_decode(files))
        return ImageSet(images, torch.tensor(labels, dtype=torch.long), self._classes())

    def _classes(self) -> list[str]:
        return class_names(
            read_wnids(self.folder / "wnids.txt"), read_words(self.folder / "words.txt")
        )

    def _extract_complete(self) -> None:
        """Extract, and check that the files that label the images are there."""
        self.extract()
        for name in LABEL_FILES:
            if not (self.folder / name).is_file():
                raise UserError(incomplete(self.folder, self.folder / name))

    def cache_path(self, key: str) -> Path:
        return self.root / f"{self.FOLDER}.cache-{key}.npz"

    def _cache(self) -> Path:
        """The cache of the data as it is on disk now, decoded and written first if missing."""
        self._extract_complete()
        wnids = read_wnids(self.folder / "wnids.txt")
        train_files, train_labels = _train_files(self.folder / "train", wnids)
        test_files, test_labels = _val_files(self.folder / "val", wnids)
        labelling = [self.folder / "wnids.txt", self.folder / "val" / "val_annotations.txt"]
        path = self.cache_path(_cache_key(self.folder, [*labelling, *train_files, *test_files]))
        if not path.is_file():
            arrays = {
                "train_images": _decode(train_files),
                "train_labels": np.asarray(train_labels, dtype=np.int64),
                "test_images": _decode(test_files),
                "test_labels": np.asarray(test_labels, dtype=np.int64),
            }
            self._write_cache(path, arrays)
        return path

    def _write_cache(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        """Write atomically (a temporary file renamed into place) and delete caches of older
        versions of the data, which are as large as this one."""
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(partial, path)
        finally:
            Path(partial).unlink(missing_ok=True)
        for stale in self.root.glob(f"{self.FOLDER}.cache-*.npz"):
            if stale != path:
                stale.unlink()
        log.info("Cached the decoded Tiny ImageNet images in %s", path)


def incomplete(folder: Path, missing: Path) -> str:
    """The message for a file missing from an extracted folder, and the fix."""
    return (
        f"{missing} is missing: {folder} is not a complete Tiny ImageNet folder. Delete it, and "
        "the next run extracts (or downloads) the archive again"
    )


def read_wnids(path: Path) -> list[str]:
    """The class ids, sorted so that class indices never depend on the file's order."""
    wnids = sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})
    if not wnids:
        raise UserError(f"{path} lists no class ids")
    return wnids


def read_words(path: Path) -> dict[str, str]:
    """wnid -> its first name in words.txt ("goldfish, Carassius auratus" -> "goldfish")."""
    names = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        wnid, sep, words = line.partition("\t")
        if not sep:
            raise UserError(f"{path}:{number}: expected 'wnid<TAB>names', got {line!r}")
        names[wnid.strip()] = words.split(",")[0].strip()
    return names


def class_names(wnids: list[str], words: dict[str, str]) -> list[str]:
    """A readable, unique name per class: the first name, with " (wnid)" appended to every name
    that several classes share; a wnid without words stands for itself."""
    names = [words.get(wnid) or wnid for wnid in wnids]
    return [
        f"{name} ({wnid})" if names.count(name) > 1 else name
        for name, wnid in zip(names, wnids, strict=True)
    ]


def _train_files(train_dir: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        images_dir = train_dir / wnid / "images"
        if not images_dir.is_dir():
            raise UserError(
                incomplete(train_dir.parent, images_dir) + f" (class {wnid} of wnids.txt)"
            )
        names = sorted(e.name for e in os.scandir(images_dir) if e.name.lower().endswith(".jpeg"))
        files += [images_dir / name for name in names]
        labels += [label] * len(names)
    return files, labels


def _val_files(val_dir: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """The val images with their labels from val_annotations.txt (not from folders: the val
    images all lie in one folder)."""
    annotations = val_dir / "val_annotations.txt"
    index = {wnid: label for label, wnid in enumerate(wnids)}
    files, labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise UserError(
                f"{annotations}:{number}: expected 'file<TAB>wnid<TAB>box' with a wnid of "
                f"wnids.txt, got {line!r}"
            )
        image = val_dir / "images" / fields[0]
        if not image.is_file():
            listed = f" (listed in {annotations}:{number})"
            raise UserError(incomplete(val_dir.parent, image) + listed)
        files.append(image)
        labels.append(index[fields[1]])
    return files, labels


def _cache_key(folder: Path, files: list[Path]) -> str:
    """A digest of every file's path in `folder`, size and modification time (a stat each, no
    reading), in order: images and the files that label them."""
    digest = hashlib.sha1(_CACHE_VERSION.encode(), usedforsecurity=False)
    start = len(str(folder)) + 1
    for path in map(str, files):
        stat = os.stat(path)
        digest.update(f"{path[start:]}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _decode(files: list[Path]) -> np.ndarray:
    """The images as one uint8 array (N, 3, 64, 64); grayscale JPEGs become RGB."""
    log.info("Decoding %d Tiny ImageNet images (once; later runs read the cache)", len(files))
    array = np.empty((len(files), 3, SIZE, SIZE), dtype=np.uint8)
    for i, (path, image) in enumerate(zip(files, map_files(load_image, files), strict=True)):
        if image.size != (SIZE, SIZE):
            raise UserError(f"{path} is {image.size[0]}x{image.size[1]}, expected {SIZE}x{SIZE}")
        array[i] = np.asarray(image).transpose(2, 0, 1)
    return array
