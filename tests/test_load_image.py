"""thaw.data.images.load_image: every mode to RGB, transparency on white, EXIF orientation
followed, and bad files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_formats import write_exif_rotated_jpeg, write_truncated_jpeg
from thaw.data.images import load_image


def rgb_at(path: Path, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    image = load_image(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_load_image_turns_every_mode_into_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (6, 4), 77).save(gray)
    assert rgb_at(gray) == (77, 77, 77)

    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert rgb_at(tmp_path / "palette.png") == (10, 200, 30)

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(cmyk, quality=95)
    assert all(v >= 250 for v in rgb_at(cmyk))  # no ink is white

    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(deep)  # 16-bit gray
    assert [rgb_at(deep, (x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I").save(wide)
    assert [rgb_at(wide, (x, 0)) for x in range(2)] == [(0,) * 3, (255,) * 3]


def test_load_image_puts_transparency_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent
    rgba.putpixel((2, 0), (255, 0, 0, 128))  # half transparent red
    rgba.save(tmp_path / "rgba.png")
    assert [rgb_at(tmp_path / "rgba.png", (x, 0)) for x in range(3)] == [
        (255, 0, 0),
        (255, 255, 255),
        (255, 127, 127),
    ]
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert rgb_at(tmp_path / "la.png") == (255, 255, 255)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "clear.gif", transparency=0)
    assert rgb_at(tmp_path / "clear.gif") == (255, 255, 255)
    assert rgb_at(tmp_path / "clear.gif", (1, 0)) == (10, 200, 30)


def test_load_image_follows_exif_orientation(tmp_path: Path) -> None:
    image = load_image(write_exif_rotated_jpeg(tmp_path / "photo.jpg", size=(20, 10)))
    assert image.size == (10, 20)
    red, green, _ = image.getpixel((8, 1))  # top-right corner, where the block turned to
    assert red > 200 and green < 60
    assert max(image.getpixel((1, 1))) < 60


def test_load_image_names_bad_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(OSError, match="broken.png"):
        load_image(broken)
    with pytest.raises(OSError, match="cut.jpg"):
        load_image(write_truncated_jpeg(tmp_path / "cut.jpg"))
