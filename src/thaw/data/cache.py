"""The decoded cache (`data.cache`): image files decoded once into uint8 pixels at their training
size, memory-mapped, so later epochs and later runs read pixels instead of decoding photos, and
take the batched device path.

An entry is one split of one folder: `<dir>/<split>-<digest of the folder>.npy`, an (N, 3, S, S)
uint8 array of what the per-image path has before its augmentations (the decode, EXIF rotation,
transparency on white, RGB, the shorter side resized to S and the centre S x S crop, S being
the preprocessing's resize size), and its `.json` index: every file's real path, size and
modification time, and S. A later run reuses the entry while all of that is unchanged, and
rebuilds it, saying why, when it is not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thaw.data.images import load_image
from thaw.data.sources.base import ImageSet
from thaw.data.verify import file_key, file_mapper, usable_cores
from thaw.errors import UserError
from thaw.preprocess import Preprocessing
from thaw.progress import track

log = logging.getLogger(__name__)

# Part of every index: bump it when the decoding or the array's layout changes meaning.
FORMAT = 1
_GB = 1e9


def cached_set(
    images: ImageSet, split: str, folder: Path, preprocessing: Preprocessing
) -> ImageSet:
    """`images` (a set of files) as an in-memory set, index for index (same labels and ids),
    whose pixels are the cache entry's memory map, reused or built first."""
    files = [Path(path) for path in images.images]  # type: ignore[union-attr]
    entry = folder / f"{split}-{_digest(files)}"
    side = preprocessing.resize_size
    wanted = _index(files, side, preprocessing.grayscale)
    pixels, index = entry.with_suffix(".npy"), entry.with_suffix(".json")
    stale = _stale(index, pixels, wanted)
    described = f"{len(files)} images at {side} px"
    if stale is None:
        log.info("Decoded cache (%s split): reusing %s, %s", split, pixels, described)
    else:
        log.info("Decoded cache (%s split): building %s, %s: %s", split, pixels, described, stale)
        _build(files, wanted, pixels, index, split, preprocessing)
    array = np.load(pixels, mmap_mode="c")  # copy-on-write: a writable view, the file untouched
    return ImageSet(torch.from_numpy(array), images.labels, images.classes, images.ids)


def fitted_image(image: Path | torch.Tensor, preprocessing: Preprocessing) -> np.ndarray:
    """An image's cached pixels (a file's, or an in-memory one's): (3, S, S) uint8, through the
    evaluation transform cropped at the resize size S (the per-image path's own steps, without
    normalisation). What data.cache and the shards of data=streaming hold."""
    side = preprocessing.resize_size
    fit = dataclasses.replace(preprocessing, input_size=side).transform(normalize=False)
    decoded = image if isinstance(image, torch.Tensor) else load_image(image, side)
    return fit(decoded).numpy()


def _digest(files: list[Path]) -> str:
    """Names the folder the files share, not the files: a changed file list rebuilds the same
    entry rather than adding one."""
    common = os.path.commonpath([os.path.realpath(path) for path in files]) if files else ""
    return hashlib.sha256(common.encode()).hexdigest()[:12]


def _index(files: list[Path], side: int, grayscale: bool) -> dict[str, Any]:
    keys = []
    for path in files:
        key = file_key(path)
        if key is None:
            raise UserError(f"data.cache: cannot read image file {path}: replace or remove it")
        keys.append(list(key))
    return {"format": FORMAT, "side": side, "grayscale": grayscale, "files": keys}


def _stale(index: Path, pixels: Path, wanted: dict[str, Any]) -> str | None:
    """Why the entry cannot be reused; None when it can."""
    if not index.exists():
        return "no cache yet"
    try:
        found = json.loads(index.read_text())
        shape = np.load(pixels, mmap_mode="r").shape
    except (OSError, ValueError) as err:
        return f"the entry does not read ({err})"
    if found.get("format") != FORMAT:
        return "it was written by another version of thaw"
    for key in ("side", "grayscale"):
        if found.get(key) != wanted[key]:
            return f"the resize settings changed ({key} {found.get(key)} -> {wanted[key]})"
    if found.get("files") != wanted["files"]:
        return _changed_files(found.get("files") or [], wanted["files"])
    if shape != (len(wanted["files"]), 3, wanted["side"], wanted["side"]):
        return f"its pixel file has shape {shape}"
    return None


def _changed_files(old: list[list[Any]], new: list[list[Any]]) -> str:
    """Which files differ, counted, with one named."""
    old_paths, new_paths = {key[0]: key for key in old}, {key[0]: key for key in new}
    added = [path for path in new_paths if path not in old_paths]
    removed = [path for path in old_paths if path not in new_paths]
    changed = [path for path, key in new_paths.items() if old_paths.get(path, key) != key]
    parts = [
        f"{len(paths)} files {what} (e.g. {paths[0]})"
        for what, paths in (("changed", changed), ("added", added), ("removed", removed))
        if paths
    ]
    return ", ".join(parts) or "the files are in another order"


def _build(
    files: list[Path],
    wanted: dict[str, Any],
    pixels: Path,
    index: Path,
    split: str,
    preprocessing: Preprocessing,
) -> None:
    """Decode every file in parallel into a new array, then swap it in: a run reading the old
    entry keeps its open file, and an interrupted build leaves no half-written entry."""
    side = wanted["side"]
    pixels.parent.mkdir(parents=True, exist_ok=True)
    needed = len(files) * 3 * side * side
    free = shutil.disk_usage(pixels.parent).free
    if needed > free:
        raise UserError(
            f"data.cache={pixels.parent}: the {split} split's decoded cache needs "
            f"{needed / _GB:.1f} GB ({len(files)} images at {side} px), but that disk has "
            f"{free / _GB:.1f} GB free: free some space, point data.cache at a larger disk, or "
            "leave data.cache out"
        )
    partial_pixels = pixels.with_name(f".{pixels.stem}.{os.getpid()}.npy")
    shape = (len(files), 3, side, side)
    try:
        array = np.lib.format.open_memmap(partial_pixels, "w+", np.uint8, shape)
        decode = partial(fitted_image, preprocessing=preprocessing)
        with file_mapper(len(files), usable_cores()) as mapped:
            decoded = track(mapped(decode, files), f"Decoding the {split} split once", len(files))
            for row, image in enumerate(decoded):
                array[row] = image
        array.flush()
        del array
        os.replace(partial_pixels, pixels)
    finally:
        partial_pixels.unlink(missing_ok=True)
    index.write_text(json.dumps(wanted))
