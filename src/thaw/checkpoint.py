"""Reading checkpoints safely, and what a thaw checkpoint carries besides weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thaw.errors import UserError
from thaw.postprocess import split_legacy_preprocessing

log = logging.getLogger(__name__)

# The key under which a thaw checkpoint carries its RunRecord.
RUN_KEY = "thaw"
# The layout of a thaw checkpoint: 2 holds the model module's weights under `model.` (the
# training task's attribute) and the Postprocessing beside the Preprocessing. Checkpoints
# without a format are thaw's first layout, which `upgrade` turns into this one.
FORMAT = 2
MODEL_PREFIX = "model."
# Where the model's rejection score keeps its buffers (ImageClassifier.rejection).
REJECTION_PREFIX = MODEL_PREFIX + "rejection."
DATA_TARGET = "thaw.data.settings.DataSettings.of"  # conf/data_base.yaml's _target_
# The record's entry holding weights_digest of the checkpoint's weights, set on every save.
DIGEST_KEY = "weights_sha256"
# Set to 1 to load a checkpoint whose weights do not match its digest, with a warning.
ALLOW_MISMATCH_ENV = "THAW_ALLOW_DIGEST_MISMATCH"
# The temporary files save_atomically writes beside a checkpoint (`.<name>.<random>.tmp`).
TEMP_GLOB = ".*.tmp"


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or not what the caller needs."""


def file_identity(path: str | Path) -> dict[str, str]:
    """How an open route or an exported file names a file: its basename and SHA-256, which
    tell the file apart without revealing the server's directories."""
    path = Path(path)
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    return {"file": path.name, "sha256": digest}


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
    upgrade(checkpoint)
    check_digest(checkpoint, path)
    return checkpoint


def weights_digest(state_dict: dict[str, Any]) -> str:
    """SHA-256 of the model's weights (the `model.` entries: names, dtypes, shapes and bytes),
    which a flipped bit on disk or a half-copied file changes while torch may still load it."""
    import torch  # noqa: PLC0415 (see read_checkpoint)

    digest = hashlib.sha256()
    for name in sorted(k for k in state_dict if k.startswith(MODEL_PREFIX)):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def check_digest(checkpoint: dict[str, Any], path: str | Path) -> None:
    """A thaw checkpoint's weights against the digest it was saved with (older checkpoints have
    none): a mismatch is a CheckpointError naming the file, or with THAW_ALLOW_DIGEST_MISMATCH=1
    a warning, and the weights load as they are."""
    record = checkpoint.get(RUN_KEY)
    state = checkpoint.get("state_dict")
    if not isinstance(record, dict) or DIGEST_KEY not in record or not isinstance(state, dict):
        return
    if weights_digest(state) == record[DIGEST_KEY]:
        return
    problem = (
        f"checkpoint {path}: its weights do not match the digest saved with them, so the file "
        "changed on disk (a flipped bit, a partial copy) or was edited"
    )
    if os.environ.get(ALLOW_MISMATCH_ENV) == "1":
        log.warning("%s. Loading it anyway, as %s=1 asks", problem, ALLOW_MISMATCH_ENV)
        return
    raise CheckpointError(
        f"{problem}. Copy it again from its source, or set {ALLOW_MISMATCH_ENV}=1 to load it "
        "as it is"
    )


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A thaw checkpoint in today's layout (FORMAT), in place; other files as they are. The one
    migration: every reader (read_checkpoint, and the training task when Lightning resumes)
    goes through it, so a checkpoint of an older thaw loads, predicts and resumes the same.

    The first layout kept the network's weights at the top of the state_dict (`backbone.*`,
    `head.*`: the training module was the network) and the temperature inside the
    preprocessing; its config's data group instantiated the DataModule, and may predate the
    keys `model.family`, `model.stem_stride`, `data.test_fraction` and `data.skip_bad_images`
    (set to what those versions did)."""
    record = checkpoint.get(RUN_KEY)
    if not isinstance(record, dict) or record.get("format", 1) >= FORMAT:
        return checkpoint
    state = checkpoint.get("state_dict")
    if isinstance(state, dict):
        network = ("backbone.", "head.")
        checkpoint["state_dict"] = {
            (MODEL_PREFIX + k if k.startswith(network) else k): v for k, v in state.items()
        }
    if isinstance(record.get("preprocessing"), dict):
        preprocessing, postprocessing = split_legacy_preprocessing(record["preprocessing"])
        record["preprocessing"], record["postprocessing"] = preprocessing, postprocessing
    config = record.get("config", {})
    model, data = config.get("model"), config.get("data")
    if isinstance(model, dict):
        model.setdefault("family", "torchvision")
        model.setdefault("stem_stride", None)
    if isinstance(data, dict):  # the data group instantiated the DataModule itself
        data["_target_"] = DATA_TARGET
        data.setdefault("test_fraction", 0.1)
        data.setdefault("skip_bad_images", False)
    record["format"] = FORMAT
    return checkpoint


@dataclass(frozen=True)
class RunRecord:
    """What a thaw checkpoint carries besides weights: the composed config, the class names
    (label i is classes[i]), and the Preprocessing (None in checkpoints written before thaw saved
    it) and Postprocessing as plain values."""

    config: dict[str, Any]
    classes: list[str]
    preprocessing: dict[str, Any] | None
    postprocessing: dict[str, Any]


def run_record(checkpoint: dict[str, Any], path: str | Path) -> RunRecord:
    """The RunRecord of a thaw checkpoint; a clear error for any other file."""
    info = checkpoint.get(RUN_KEY)
    if not isinstance(info, dict) or not {"config", "classes"} <= info.keys():
        raise CheckpointError(
            f"{path} is not a thaw checkpoint (it has no {RUN_KEY!r} entry with config and "
            "classes): give checkpoints/best.ckpt or last.ckpt of a thaw run"
        )
    return RunRecord(
        info["config"],
        list(info["classes"]),
        info.get("preprocessing"),
        info.get("postprocessing") or {},
    )


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


def update_run_record(
    path: str | Path, module: tuple[str, Mapping[str, Any]] | None = None, **values: Any
) -> None:
    """Set entries of the RunRecord of the thaw checkpoint at `path` (e.g. its `postprocessing`)
    and, with `module` = (prefix, tensors), replace every weight under `prefix` (e.g.
    "model.rejection.") by `tensors` (named below it), keeping everything else, and write it back
    atomically (see `save_atomically`)."""
    checkpoint = read_checkpoint(path)
    run_record(checkpoint, path)  # a clear error for a file that is not a thaw checkpoint
    checkpoint[RUN_KEY].update(values)
    if module is not None:
        prefix, tensors = module
        state = checkpoint["state_dict"]
        for name in [k for k in state if k.startswith(prefix)]:
            del state[name]
        state.update({prefix + name: tensor for name, tensor in tensors.items()})
    save_atomically(checkpoint, path)


def save_atomically(checkpoint: dict[str, Any], path: str | Path) -> None:
    """`torch.save` to a temporary file beside `path` (matching TEMP_GLOB), then rename it
    over `path`: a reader (or a crash) sees the old file or the new one, never half of one. The
    new file keeps the old one's permissions (a new one gets the usual ones). A thaw
    checkpoint's record gets the digest of its weights (see check_digest). Errors are raised as
    they are, never swallowed."""
    path = Path(path)
    record, state = checkpoint.get(RUN_KEY), checkpoint.get("state_dict")
    if isinstance(record, dict) and isinstance(state, dict):
        record[DIGEST_KEY] = weights_digest(state)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    import torch  # noqa: PLC0415 (see read_checkpoint)

    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """The mode `open` gives a new file (mkstemp's is 0o600): 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
