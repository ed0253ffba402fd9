"""Turning an uploaded file into a decoded image, or into the HTTP error that says what is wrong.

An upload is untrusted: it may be no image at all (415), decode to more pixels than the server
takes (413: a PNG of one colour is a few KB and decodes to hundreds of MB), or be cut off or
corrupt (400). Each becomes an `UploadError` for that upload alone, so the other requests and
the server go on. The size is read from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from thaw.data.images import load_image


@dataclass
class UploadError(Exception):
    """An upload the server cannot use: the HTTP status and a sentence saying why."""

    status: int
    detail: str

    def __str__(self) -> str:
        return self.detail


def decoded_pixels(data: bytes, min_size: int | None, max_pixels: int) -> int:
    """The pixels `decode_upload(data, min_size)` will decode, from the header alone: a JPEG's
    size after `draft` (the reduced scale load_image decodes it at), any other format's full
    size. Over `max_pixels` (max_image_pixels) is a 413 naming both."""
    if not data:
        raise UploadError(400, "the upload is empty: send an image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            declared = image.size
            if min_size is not None:
                image.draft("RGB", (min_size, min_size))  # as load_image does
            width, height = image.size
    except UnidentifiedImageError:
        raise UploadError(
            415, "the upload is not an image Pillow can read (send a JPEG, PNG, WebP, ...)"
        ) from None
    except Image.DecompressionBombError as err:  # declared over twice Pillow's own limit
        raise UploadError(413, f"the image is too large to decode: {err}") from None
    except Exception as err:  # Pillow raises many types for a corrupt header
        raise UploadError(400, f"the image could not be read: {err}") from None
    if width * height > max_pixels:
        scaled = (
            "" if declared == (width, height) else f" (it declares {declared[0]}x{declared[1]})"
        )
        raise UploadError(
            413,
            f"the image decodes to {width}x{height} = {width * height:,} pixels{scaled}, over "
            f"the server's limit of {max_pixels:,} (max_image_pixels): send a smaller image",
        )
    return width * height


def decode_upload(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decode `data` as predict decodes a file (RGB, upright; JPEGs at a reduced scale that
    still covers `min_size`). Call `decoded_pixels` first: this decodes whatever it is given."""
    try:
        return load_image(io.BytesIO(data), min_size)
    except OSError as err:
        raise UploadError(400, str(err)) from None
