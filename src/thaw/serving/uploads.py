"""Turning an uploaded file into a decoded image, or into the HTTP error that says what is wrong.

An upload is untrusted: it may be no image at all (415), declare a size that would exhaust memory
when decoded (400, Pillow's pixel limit), or be cut off or corrupt (400). Each becomes an
`UploadError` for that upload alone, so the other requests and the server go on.
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


def decode_upload(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decode `data` as predict decodes a file (RGB, upright; JPEGs at a reduced scale that
    still covers `min_size`)."""
    if not data:
        raise UploadError(400, "the upload is empty: send an image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise UploadError(
            415, "the upload is not an image Pillow can read (send a JPEG, PNG, WebP, ...)"
        ) from None
    except Image.DecompressionBombError as err:
        raise UploadError(400, f"the image is too large to decode safely: {err}") from None
    except Exception as err:  # Pillow raises many types for a corrupt header
        raise UploadError(400, f"the image could not be read: {err}") from None
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise UploadError(
            400,
            f"the image declares {width}x{height} pixels, more than the "
            f"{Image.MAX_IMAGE_PIXELS} that are decoded safely",
        )
    try:
        return load_image(io.BytesIO(data), min_size)
    except OSError as err:
        raise UploadError(400, str(err)) from None
