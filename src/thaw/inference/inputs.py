"""The image files a prediction reads, from one `inputs` value: a folder, a glob, a file or a list.

A folder is searched recursively, like a training image folder (same suffixes, hidden files and
folders skipped); a glob keeps the image files it matches; a .txt file lists one path per line,
relative to the .txt; any other file is the one image. Folders and globs come back sorted, a list
in its own order, so that row i of the output is line i of the list.
"""

from __future__ import annotations

import glob
from pathlib import Path

from thaw.data.sources.imagefolder import IMAGE_SUFFIXES, read_image_list
from thaw.errors import UserError

LIST_SUFFIX = ".txt"
_GLOB_CHARS = frozenset("*?[")


def resolve_inputs(value: str | Path, key: str = "inputs") -> list[Path]:
    """The image files `value` (the setting `key`) names; an error that says what to give when
    there are none."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(
            file
            for file in path.rglob("*")
            if _is_image(file) and not any(p.startswith(".") for p in file.relative_to(path).parts)
        )
    elif path.is_file() and path.suffix.lower() == LIST_SUFFIX:
        files = read_image_list(path)
    elif path.is_file():
        files = [path] if _is_image(path) else []
    elif _GLOB_CHARS & set(text):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if _is_image(Path(p)))
    else:
        files = []
    if not files:
        raise UserError(
            f"{key}={text!r} matches no image file. Give a folder (searched recursively), a glob "
            f"in quotes such as 'photos/**/*.jpg', one image file, or a {LIST_SUFFIX} file with "
            f"one image path per line; image files end in {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    return files


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
