"""Decoding image files the way cameras and web shops write them, into upright 8-bit RGB.

One decoder for every file-based source, so a photo looks the same whether it is read for training,
for checking the data or for computing statistics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, ImageOps

from thaw.errors import UserError

# Modes holding more than 8 bits per pixel; Pillow's own convert("RGB") would clip them to 255.
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_WHITE = (255, 255, 255, 255)
_CHUNK = 256

T = TypeVar("T")


class ImageDecodeError(UserError, OSError):
    """A file that is not a readable image (corrupt, truncated, or not an image at all). An
    OSError too, as PIL's own errors for such a file are."""


def load_image(path: Path | BinaryIO, min_size: int | None = None) -> Image.Image:
    """Decode an image file (or an open binary file: an upload) to RGB, turned upright as its
    EXIF orientation says (phone photos).

    `min_size` lets a JPEG decode at a reduced scale that keeps both sides >= min_size, which is
    several times faster for camera photos that are resized down anyway. Any failure, whatever
    Pillow raises for a corrupt or truncated file, becomes an ImageDecodeError naming the file.
    """
    try:
        with Image.open(path) as image:
            if min_size is not None:
                image.draft("RGB", (min_size, min_size))
            return to_rgb(ImageOps.exif_transpose(image))
    except Exception as err:  # PIL raises many types for a corrupt or truncated file
        if not isinstance(path, Path):
            raise ImageDecodeError(f"could not decode image upload: {err}") from err
        raise ImageDecodeError(
            f"could not decode image {path}: {err}. Replace or remove the file"
        ) from err


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: transparency composited on white (a product shot's background is
    white, and black would invent a dark border), 16/32-bit grayscale scaled from the 16-bit range
    rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_INT_MODES:
        pixels = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), "L")
    elif image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    return image.convert("RGB")


def decode_workers() -> int:
    """Threads for decoding many files: Pillow releases the GIL while it decodes."""
    return min(8, os.cpu_count() or 1)


def map_files(function: Callable[[Path], T], paths: Sequence[Path]) -> Iterator[T]:
    """`function` applied to every path on a thread pool, results in the order of `paths`; paths
    are submitted a chunk at a time so a long list never holds every result at once."""
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for start in range(0, len(paths), _CHUNK):
            yield from pool.map(function, paths[start : start + _CHUNK])
