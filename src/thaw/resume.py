"""Continuing a run: which checkpoint to continue from, whether it can continue this run, and
the state a bit-exact resume needs beyond Lightning's own."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from thaw.checkpoint import CheckpointError, read_checkpoint, run_record
from thaw.errors import UserError

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` means this run dir's last checkpoint, which must exist; `auto` means that one
    when it exists and a fresh start when it does not (so a requeued or pre-empted cluster job
    continues without edits); anything else must be an existing file."""
    if ckpt_path is None:
        return None
    last = output_dir / "checkpoints" / "last.ckpt"
    if ckpt_path == "auto":
        if last.is_file():
            log.info("ckpt_path=auto: resuming from %s", last)
            return str(last)
        log.info("ckpt_path=auto: no %s yet, starting fresh", last)
        return None
    path = last if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file() and ckpt_path == "last":
        raise UserError(
            f"ckpt_path=last: this run dir has no {path}. Each run gets a new dir: to resume "
            "one, give its dir, hydra.run.dir=<run dir>, or its file, "
            "ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path!r}: {path} does not exist")
    return str(path)


def check_resumable(path: str | Path, model_name: str, classes: list[str]) -> None:
    """Fail before training when `path` cannot continue this run: another model or classes."""
    record = run_record(read_checkpoint(path), path)
    saved_model = record.config["model"]["name"]
    if saved_model != model_name:
        raise CheckpointError(
            f"ckpt_path={path} was trained with model.name={saved_model}, "
            f"but this run has model.name={model_name}"
        )
    if record.classes != classes:
        raise CheckpointError(
            f"ckpt_path={path} was trained on {len(record.classes)} classes {record.classes}, "
            f"but this run's data has {len(classes)}: {classes}"
        )


class ResumeState(pl.Callback):
    """What a bit-exact resume needs beyond Lightning's own state.

    Carries the torch RNG state (dropout, batch-level augmentation) and the training loader's
    position in every checkpoint, and on SIGTERM, which a cluster sends before it pre-empts a
    job, saves `last.ckpt` (in the checkpoint callback's directory) after the batch in flight.

    Both are restored at train start, after the sanity check (whose loader draws from the RNG)
    and before the loader draws its first batch. Lightning stores a stateful loader's position
    too, but never restores it when the loader was built before the checkpoint was loaded, as
    `estimated_stepping_batches` in `configure_optimizers` does.
    """

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        state = {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}
        loader = self._train_loader
        if loader is not None:
            state["train_loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict  # applied at train start: the sanity check draws randomness

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @property
    def _train_loader(self) -> Any:
        trainer = getattr(self, "_trainer", None)
        loader = trainer.train_dataloader if trainer is not None else None
        return loader if hasattr(loader, "load_state_dict") else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._restored = self._restored, None
        if state is None:
            return
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if "train_loader" in state and self._train_loader is not None:
            self._train_loader.load_state_dict(state["train_loader"])

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = Path(dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("SIGTERM: saved a resumable checkpoint, resume with ckpt_path=%s", path)
