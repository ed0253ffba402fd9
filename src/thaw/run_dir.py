"""A training's run dir, made safe to write before any data is read: writable, held by one live
training at a time, and cleared of temporary files a killed save left.

The hold is an advisory lock (`flock`) on `<run dir>/.lock`, which holds the owner's pid and host.
The kernel drops it when the owner dies, however it dies, so a lock left by a killed run is taken
over, with a log line, and a live one is refused. One process holds it per run: the launching one
(rank 0); DDP ranks it starts (with RANK or LOCAL_RANK set) share its hold. Under the command
line the hold is taken by a Hydra callback (conf/train.yaml), before Hydra writes the run's
.hydra/ configs, so a refused run changes nothing in the dir; `thaw.train.run` takes it too, for
runs started from Python.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from thaw import checks
from thaw.checkpoint import TEMP_GLOB
from thaw.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# Set by launchers for every process of a distributed run but the first (as Lightning reads them).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

# The run dirs this process holds: resolved path -> the open lock file's descriptor.
_held: dict[str, int] = {}


class RunDirInUseError(UserError):
    """Another live process trains into this run dir."""


def launch_rank() -> int:
    """This process's rank as its launcher set it (0 when none did)."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def check_writable(run_dir: Path, checkpoint_dirs: Iterable[Path]) -> None:
    """The run dir and every checkpoint folder can be written: a second's check rather than
    an epoch's training lost to the first save."""
    checks.writable("hydra.run.dir", run_dir, folder=True)
    for folder in checkpoint_dirs:
        checks.writable("callbacks.model_checkpoint.dirpath", folder, folder=True)


def acquire(run_dir: Path) -> None:
    """Hold `run_dir` for this process (again: nothing to do), or refuse it in use; then
    remove temporary files a killed save left in its checkpoints/ folder."""
    key = str(run_dir.resolve())
    if key in _held or launch_rank() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise RunDirInUseError(
            f"hydra.run.dir={run_dir} is in use by a training that is still running ({owner}). "
            "Two trainings into one dir would mix their checkpoints and metrics: give another "
            "hydra.run.dir, or wait for that one to end"
        ) from None
    previous = os.pread(descriptor, 256, 0).decode(errors="replace").strip()
    if previous:
        log.warning(
            "Took over %s, left by a run that ended without releasing it (%s)", path, previous
        )
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _held[key] = descriptor
    remove_temporary_files(run_dir / "checkpoints")


def release(run_dir: Path) -> None:
    """Let `run_dir` go (the lock file stays, emptied: removing it could let two runs in)."""
    descriptor = _held.pop(str(run_dir.resolve()), None)
    if descriptor is not None:
        os.ftruncate(descriptor, 0)
        os.close(descriptor)


@contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` while the block runs; a hold taken before (by the Hydra callback) is kept."""
    held_before = str(run_dir.resolve()) in _held
    acquire(run_dir)
    try:
        yield
    finally:
        if not held_before:
            release(run_dir)


def remove_temporary_files(folder: Path) -> None:
    """The temporary files of saves that were cut off (thaw.checkpoint.save_atomically): safe
    to remove only while the run dir is held, when no save is under way."""
    left = sorted(folder.glob(TEMP_GLOB)) if folder.is_dir() else []
    for path in left:
        path.unlink(missing_ok=True)
    if left:
        log.warning(
            "Removed %d temporary files left by a save that was cut off: %s",
            len(left),
            ", ".join(p.name for p in left),
        )


class HoldRunDir(Callback):
    """Hydra callback (conf/train.yaml): hold the run dir before Hydra writes into it. The dir
    is resolved once here and fixed in the config, so a `${now:...}` in it cannot name a
    different second when Hydra makes it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            run_dir = OmegaConf.select(config, "hydra.run.dir", throw_on_resolution_failure=True)
        except OmegaConfBaseException:
            return  # refers to Hydra's runtime values: thaw.train.run holds it instead
        with read_write(config.hydra):
            config.hydra.run.dir = run_dir
        try:
            check_writable(Path(run_dir), [])
            acquire(Path(run_dir))
        except UserError as err:
            from thaw.cli import exit_with  # noqa: PLC0415 (the command line's, as this callback)

            exit_with(err)  # Hydra turns an exception raised here into a warning and goes on

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release(Path(config.hydra.run.dir))
