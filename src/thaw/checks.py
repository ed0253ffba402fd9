"""The checks of config values, in one place: each names the key, the value and what it must be.

Hydra passes config values on as they are, so `data.batch_size=abc` or `data.val_fraction=1.5`
would otherwise fail deep inside a run. Every site that takes a config value checks it with one
of these, and each raises a UserError (one paragraph, exit 2 at the command line).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thaw.errors import UserError


def integer(
    key: str,
    value: Any,
    minimum: int | None = None,
    nullable: bool = False,
    *,
    maximum: int | None = None,
) -> None:
    """`value` is an int (a bool is not) in [`minimum`, `maximum`] (either bound may be None),
    or None where `nullable`."""
    if nullable and value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        what = "an integer" + _bounds(minimum, maximum, "")
        what += " or null" if nullable else ""
        raise UserError(f"{key} must be {what}, got {value!r}")


def number(
    key: str,
    value: Any,
    minimum: float | None = None,
    nullable: bool = False,
    *,
    maximum: float | None = None,
) -> None:
    """`value` is an int or a float (a bool is not) in [`minimum`, `maximum`] (either bound may
    be None), or None where `nullable`."""
    if nullable and value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        what = "a number" + _bounds(minimum, maximum, "g")
        what += " or null" if nullable else ""
        raise UserError(f"{key} must be {what}, got {value!r}")


def _bounds(minimum: float | None, maximum: float | None, spec: str) -> str:
    """' >= 1', ' <= 30', ' in [0, 1]' or nothing, the bounds formatted with `spec`."""
    if minimum is not None and maximum is not None:
        return f" in [{minimum:{spec}}, {maximum:{spec}}]"
    if minimum is not None:
        return f" >= {minimum:{spec}}"
    if maximum is not None:
        return f" <= {maximum:{spec}}"
    return ""


def fraction(key: str, value: Any) -> None:
    """`value` is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UserError(f"{key} must be a number in [0, 1), got {value!r}")


def choice(key: str, value: Any, options: Sequence[Any]) -> None:
    """`value` is one of `options`."""
    if value not in options:
        raise UserError(f"{key} must be one of {list(options)}, got {value!r}")


def flag(key: str, value: Any, nullable: bool = False) -> None:
    """`value` is true or false (not a string or a number), or None where `nullable`."""
    if nullable and value is None:
        return
    if not isinstance(value, bool):
        what = "true, false or null" if nullable else "true or false"
        raise UserError(f"{key} must be {what}, got {value!r}")


def writable(key: str, path: str | Path, folder: bool = False) -> None:
    """`path` (a file, or with `folder` a folder) can be written, checked before the work whose
    result goes there, so that a mistake costs a second rather than the whole run.

    Nothing is created: the nearest folder that exists is probed with an unnamed temporary file
    (nothing is left behind if the process is killed). A permission check alone would pass for
    root, where a read-only mount, a parent that is a file or a pseudo-filesystem still fail."""
    path = Path(path)
    wanted = "a folder" if folder else "a file"
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{key}={path} is {'a file' if folder else 'a folder'}: give {wanted}")
    nearest = path if path.is_dir() else path.parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UserError(
            f"{key}={path} cannot be written: {nearest} is a file, not a folder. Give "
            f"{key}=<{wanted} you can write to>"
        )
    if path.is_file() and not os.access(path, os.W_OK):
        raise UserError(
            f"{key}={path} cannot be written: the file is read-only. Give {key}=<another file>"
        )
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as err:
        raise UserError(
            f"{key}={path} cannot be written: creating a file in {nearest} fails "
            f"({err.strerror or err}). Give {key}=<{wanted} you can write to>"
        ) from None
