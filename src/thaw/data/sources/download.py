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
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from thaw.errors import UserError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class DataUnavailableError(UserError, RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says what to place where.
    (A RuntimeError too, as it was before UserError.)"""


class ChecksumError(UserError, RuntimeError):
    """A file's md5 is not the published one (a corrupt or substituted download). (A
    RuntimeError too, as it was before UserError.)"""


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


def fetch_and_extract(
    name: str, folder: Path, archive: Path, url: str, md5: str | None, allow_download: bool
) -> Path:
    """Make sure the dataset folder `folder` exists: extract `archive` (a tar or zip whose
    top-level folder is `folder.name`), downloading it from `url` first when it is absent and
    downloads are allowed. Raises DataUnavailableError saying what to place where when neither
    works, and ChecksumError when the archive's md5 is not `md5` (None skips the check, for a
    mirror that repacks the archive). Returns `folder`."""
    if folder.is_dir():
        return folder
    root = folder.parent
    place = f"place {archive.name} (or its extracted {folder.name}/ folder) in {root}"
    if not archive.is_file():
        if not allow_download:
            raise DataUnavailableError(
                f"{name} is not in {root} and download is off: download {url} and {place}, "
                "or set data.source.download=true"
            )
        try:
            download(url, archive, md5)
        except OSError as err:
            raise DataUnavailableError(
                f"Could not download {name} from {url} ({err}): download it by other means and "
                f"{place}"
            ) from err
    else:
        check_md5(archive, md5)
    log.info("Extracting %s", archive)
    return extract(archive, folder.name, root)


def archive_path(root: Path, url: str, default: str) -> Path:
    """Where the archive of `url` is kept: root / the URL's file name (`default` if it has none)."""
    return root / (Path(urlparse(url).path).name or default)


def extract(archive: Path, member: str, dest_dir: Path) -> Path:
    """Extract the tar (any compression) or zip `archive` and move its top-level folder `member` to
    `dest_dir / member`.

    Extraction goes to a temporary folder inside `dest_dir` (same filesystem, so the final rename is
    atomic), so a failure leaves no half-extracted dataset. Tar members pass tarfile's "data" filter
    (no absolute paths, links out of the tree or device files); zipfile itself strips absolute
    paths and "..". Returns the extracted folder.
    """
    unpack = _unzip if zipfile.is_zipfile(archive) else _untar
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / member
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        try:
            unpack(archive, staging)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
            raise RuntimeError(f"{archive} could not be extracted: {err}") from err
        extracted = staging / member
        if not extracted.is_dir():
            raise RuntimeError(f"{archive} has no top-level folder {member}/")
        extracted.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _untar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # a Python older than the extraction filters (3.10.12, 3.11.4)
            tar.extractall(dest)


def _unzip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
