"""Download, checksum and extract, shared by every source that fetches files.

A download lands under a temporary name and is renamed only once its md5 matches, and an archive
is extracted into a temporary folder that is renamed into place at the end, so an interrupted or
corrupt fetch never leaves something that looks like a usable dataset.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class DataUnavailableError(RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says what to place where."""


class ChecksumError(RuntimeError):
    """A file's md5 is not the published one (a corrupt or substituted download)."""


def md5sum(path: Path) -> str:
    """The hex md5 of a file, read in chunks so large archives do not fill memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: Path, md5: str | None) -> None:
    """Raise ChecksumError naming `path` and both sums unless its md5 is `md5` (None skips)."""
    if md5 is None:
        return
    actual = md5sum(path)
    if actual != md5.lower():
        raise ChecksumError(f"{path}: md5 is {actual}, expected {md5}")


def download(url: str, dest: Path, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest`, checking its md5.

    Raises OSError (urllib's URLError included) when the server cannot be reached, ChecksumError
    when the md5 differs; in both cases nothing is left at `dest` or under a temporary name.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s to %s", url, dest)
    partial = dest.with_name(f".{dest.name}.part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                f.write(chunk)
        actual = digest.hexdigest()
        if md5 is not None and actual != md5.lower():
            raise ChecksumError(
                f"{dest.name} downloaded from {url}: md5 is {actual}, expected {md5}; "
                "the download was deleted"
            )
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def extract_tar(archive: Path, member: str, dest_dir: Path) -> Path:
    """Extract `archive` and move its top-level folder `member` to `dest_dir / member`.

    Extraction goes to a temporary folder inside `dest_dir` (same filesystem, so the final rename is
    atomic) with tarfile's "data" filter, which refuses absolute paths, links out of the tree and
    device files. Returns the extracted folder.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / member
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        try:
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, filter="data")
                else:  # a Python older than the extraction filters (3.10.12, 3.11.4)
                    tar.extractall(staging)
        except tarfile.TarError as err:
            raise RuntimeError(f"{archive} could not be extracted: {err}") from err
        extracted = staging / member
        if not extracted.is_dir():
            raise RuntimeError(f"{archive} has no top-level folder {member}/")
        extracted.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
