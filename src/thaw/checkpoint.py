"""Reading checkpoints safely, and what a thaw checkpoint carries besides weights."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The key under which a thaw checkpoint carries its RunRecord.
RUN_KEY = "thaw"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not what the caller needs."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint (or a state_dict) onto the CPU with `weights_only` (no arbitrary code
    runs on load); anything but a readable dict is a CheckpointError naming the file.

    torch is imported here, not above: Hydra loads the sweep report (which reads run records
    from this module) before every job, and a config mistake should not wait for torch."""
    import torch  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"could not read checkpoint {path}: it is truncated, corrupt, or not a torch "
            f"checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint: give a .ckpt that "
            "thaw wrote (checkpoints/best.ckpt of a run) or a state_dict saved with torch.save"
        )
    return checkpoint


@dataclass(frozen=True)
class RunRecord:
    """What a thaw checkpoint carries besides weights: the composed config, the class names
    (label i is classes[i]) and the Preprocessing as plain values (None in checkpoints written
    before thaw saved it)."""

    config: dict[str, Any]
    classes: list[str]
    preprocessing: dict[str, Any] | None


def run_record(checkpoint: dict[str, Any], path: str | Path) -> RunRecord:
    """The RunRecord of a thaw checkpoint; a clear error for any other file."""
    info = checkpoint.get(RUN_KEY)
    if not isinstance(info, dict) or not {"config", "classes"} <= info.keys():
        raise CheckpointError(
            f"{path} is not a thaw checkpoint (it has no {RUN_KEY!r} entry with config and "
            "classes): give checkpoints/best.ckpt or last.ckpt of a thaw run"
        )
    return RunRecord(info["config"], list(info["classes"]), info.get("preprocessing"))


def run_dir(checkpoint: Path) -> Path:
    """The run dir of `checkpoint`: the parent of its checkpoints/ folder, where the run's
    metrics.json and exported files are."""
    folder = checkpoint.resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def read_record(path: Path) -> dict[str, Any]:
    """A run's JSON record (metrics.json, export.json) as a dict, or {} where there is none or
    it is unreadable: a model copied without its run still loads."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def update_run_record(path: str | Path, **values: Any) -> None:
    """Set entries of the RunRecord of the thaw checkpoint at `path` (e.g. its `preprocessing`),
    keeping everything else, and write it back atomically (see `save_atomically`)."""
    checkpoint = read_checkpoint(path)
    run_record(checkpoint, path)  # a clear error for a file that is not a thaw checkpoint
    checkpoint[RUN_KEY].update(values)
    save_atomically(checkpoint, path)


def save_atomically(checkpoint: dict[str, Any], path: str | Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename it over `path`: a reader
    (or a crash) sees the old file or the new one, never half of one. The new file keeps the
    old one's permissions."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    import torch  # noqa: PLC0415 (see read_checkpoint)

    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
