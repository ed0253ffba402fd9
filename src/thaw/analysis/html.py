"""report.html: the report as one self-contained page (images embedded, no outside requests)."""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Mapping
from typing import Any

import jinja2
import markupsafe
import torch
from PIL import Image


def png_bytes(picture: Image.Image | torch.Tensor) -> bytes:
    """A PIL image, or a uint8 (3, H, W) tensor, as PNG bytes."""
    if isinstance(picture, torch.Tensor):
        picture = Image.fromarray(picture.permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as a data: URI, for an <img> that needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fixed(value: float, digits: int) -> str:
    """`value` with `digits` decimals: the report's numbers, as `{value:.4f}` writes them."""
    return f"{value:.{digits}f}"


def _thousands(value: int) -> str:
    """An integer with thousands separators: 11,177,538."""
    return f"{value:,}"


@functools.cache
def _environment() -> jinja2.Environment:
    """The templates next to this module, autoescaped: class names and paths come from users."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("thaw.analysis", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    environment.filters["fixed"] = _fixed
    environment.filters["thousands"] = _thousands
    # Base64 needs no escaping; Markup says so rather than leaving it to chance.
    environment.filters["data_uri"] = lambda png: markupsafe.Markup(data_uri(png))
    return environment


def render(report: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The page for `report` (report.json's content); `images` maps names used in the report
    (confusion, reliability, and one per example) to PNG bytes."""
    return render_page("report.html.j2", report=report, images=images)


def render_page(template: str, **context: Any) -> str:
    """One of the templates next to this module (report.html.j2, gallery.html.j2)."""
    return _environment().get_template(template).render(**context)
