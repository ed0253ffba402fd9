"""Which image files decode, checked before the first training step, so a corrupt file in the test
split stops a run at setup rather than hours later, when the test split is first read.

Each file is decoded in full, as the Dataset decodes it (thaw.data.images.load_image): a
truncated JPEG fails only once its pixels are read. Files found good are remembered in a cache
of the user's (`$XDG_CACHE_HOME/thaw`, beside torch's and Hugging Face's), keyed by the file's
real path, size and modification time, so later runs over an unchanged folder decode nothing and
a changed file is decoded again. Files that fail are not remembered: they are checked again
until they are fixed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

from thaw.data.images import load_image, map_files
from thaw.progress import track

log = logging.getLogger(__name__)

CACHE_FILE = "verified_images.sqlite"
# Files a worker process decodes per round trip: enough to hide the pickling.
_CHUNK = 64
# Seconds to wait for another run (or DDP rank) writing the cache at the same time.
_LOCK_TIMEOUT = 30.0

# A file as it is now: (real path, size, modification time in ns).
Key = tuple[str, int, int]
Mapper = Callable[[Callable[[Path], str | None], Sequence[Path]], Iterable[str | None]]


@dataclass(frozen=True)
class Verification:
    """What a check found: the files that do not decode, each with the reason, and how many
    files were decoded (the others were known good from the cache)."""

    bad: dict[Path, str]
    decoded: int


def cache_path() -> Path:
    """Per user, outside the data folder (which may be read-only or shared) and outside the run
    dir (new each run)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "thaw" / CACHE_FILE


def verify_files(
    paths: Sequence[Path],
    decode_size: int | None,
    workers: int | None = None,
    cache: Path | None = None,
) -> Verification:
    """Decode every file of `paths` not known good from `cache` (default `cache_path()`) on
    `workers` processes (default: the cores this process may use), with progress, and remember
    the good ones. A cache that cannot be read or written is named in a warning and checking
    goes on without it."""
    cache = cache or cache_path()
    keys = [file_key(path) for path in paths]
    known = _known(cache, [key for key in keys if key is not None])
    todo = [i for i, key in enumerate(keys) if key is None or key not in known]
    check = partial(_problem, decode_size=decode_size)
    bad: dict[Path, str] = {}
    good: list[Key] = []
    with file_mapper(len(todo), workers or usable_cores()) as mapped:
        # Started before the progress bar, so workers are forked before its refresh thread.
        problems = mapped(check, [paths[i] for i in todo])
        described = f"Checking that {len(todo)} images decode"
        for i, problem in zip(todo, track(problems, described, len(todo)), strict=True):
            key = keys[i]
            if problem is not None:
                bad[paths[i]] = problem
            elif key is not None:  # None: the file changed while it was read
                good.append(key)
    _remember(cache, good)
    log.info(
        "Checked that %d image files decode: %d decoded, %d known good from %s, %d bad",
        len(paths),
        len(todo),
        len(paths) - len(todo),
        cache,
        len(bad),
    )
    return Verification(bad, decoded=len(todo))


def file_key(path: Path) -> Key | None:
    """The file's cache key, None where it cannot be read (decoding it then says why)."""
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    return real, stat.st_size, stat.st_mtime_ns


def _problem(path: Path, decode_size: int | None) -> str | None:
    """Why `path` does not decode, None where it does."""
    try:
        load_image(path, decode_size)
    except OSError as err:
        return str(err.__cause__ or err)
    return None


def usable_cores() -> int:
    """The cores this process may run on (a cluster job's share, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def file_mapper(count: int, workers: int) -> Iterator[Mapper]:
    """A `map` for `count` files: serial where one chunk holds them all, else on Linux forked
    processes (per small file most of the time is Python holding the GIL, so threads gain little,
    and a fork starts at once where a spawned process re-imports torch), elsewhere, where fork is
    unsafe, threads (thaw.data.images.map_files), which still overlap the decoding itself."""
    workers = min(workers, -(-count // _CHUNK))
    if workers <= 1:
        yield map
    elif sys.platform == "linux":
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            yield partial(pool.map, chunksize=_CHUNK)
    else:
        yield map_files


def _connect(cache: Path) -> sqlite3.Connection:
    cache.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(cache, timeout=_LOCK_TIMEOUT)
    db.execute(
        "CREATE TABLE IF NOT EXISTS verified"
        " (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL)"
    )
    return db


def _known(cache: Path, keys: list[Key]) -> set[Key]:
    """Those of `keys` that the cache holds as they are now (same size and time)."""
    if not keys:
        return set()
    try:
        db = _connect(cache)
        try:
            query = "SELECT 1 FROM verified WHERE path = ? AND size = ? AND mtime_ns = ?"
            return {key for key in keys if db.execute(query, key).fetchone()}
        finally:
            db.close()
    except (OSError, sqlite3.Error) as err:
        _unusable(cache, err)
        return set()


def _remember(cache: Path, keys: list[Key]) -> None:
    """Record `keys` as decoding: a file's newer key replaces its older one."""
    if not keys:
        return
    try:
        db = _connect(cache)
        try:
            with db:
                db.executemany("INSERT OR REPLACE INTO verified VALUES (?, ?, ?)", keys)
        finally:
            db.close()
    except (OSError, sqlite3.Error) as err:
        _unusable(cache, err)


def _unusable(cache: Path, err: Exception) -> None:
    log.warning(
        "Cannot use the cache of decoded images %s (%s): every image is decoded each run. "
        "Delete the file, or set XDG_CACHE_HOME to a writable folder",
        cache,
        err,
    )
