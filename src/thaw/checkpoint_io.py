"""How a training run writes its checkpoints: every save durable, or the run stops.

Lightning's own writer (`_atomic_save`) stages the file in the system's temp dir and swallows a
PermissionError, so a run with an unwritable checkpoints/ folder trained to the end without one
checkpoint. Here each save goes through thaw.checkpoint.save_atomically (a temporary file beside
the checkpoint, fsync, rename), and a failure stops the run at once, naming the file and the OS
error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from thaw.checkpoint import run_dir, save_atomically
from thaw.errors import UserError


class CheckpointSaveError(UserError, OSError):
    """A checkpoint that could not be written: the run stops rather than go on unsaved."""


class DurableCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written atomically and durably; remote ones (s3://, ...) as Lightning
    writes them."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_atomically(checkpoint, path)
        except OSError as err:
            raise CheckpointSaveError(
                f"could not save checkpoint {path}: {err.strerror or err}. The run stopped "
                "rather than train on without checkpoints: free space or fix the folder, then "
                f"resume with ckpt_path=auto hydra.run.dir={run_dir(path)}"
            ) from err
