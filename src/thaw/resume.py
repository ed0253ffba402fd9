"""Continuing a run: which checkpoint to continue from, whether it can continue this run, and
the state a bit-exact resume needs beyond Lightning's own."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
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


class TrainingStopped(Exception):
    """Training stopped by a signal (`signum`) after saving a resumable last.ckpt; the command
    line exits 128 + signum, as a shell reports a process the signal ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class ResumeState(pl.Callback):
    """What a bit-exact resume needs beyond Lightning's own, and a stop that loses no epoch.

    Carries the torch RNG state (dropout, batch-level augmentation), the training loader's
    position and the wall time trained so far in every checkpoint. On SIGTERM, which a cluster
    sends before it pre-empts a job, and on Ctrl-C alike, it saves `last.ckpt` (in the checkpoint
    callback's directory) after the batch in flight; a second Ctrl-C stops at once.

    The RNG and loader state are restored at train start, after the sanity check (whose loader
    draws from the RNG) and before the loader draws its first batch. Lightning stores a stateful
    loader's position too, but never restores it when the loader was built before the
    checkpoint was loaded, as `estimated_stepping_batches` in `configure_optimizers` does.
    `started` is when this run began (time.perf_counter()), for `wall_time_s`.
    """

    def __init__(self, started: float | None = None) -> None:
        self._restored: dict[str, Any] | None = None
        self._started = time.perf_counter() if started is None else started
        self._earlier_s = 0.0  # the wall time of the runs this one resumes
        self._fitted = False
        self.stopped_by: int | None = None

    def wall_time_s(self) -> float:
        """Seconds trained: this run's so far, plus the runs it resumes, each up to its last
        saved checkpoint."""
        return self._earlier_s + time.perf_counter() - self._started

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        state = {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}
        state["wall_time_s"] = self.wall_time_s()
        loader = self._train_loader
        if loader is not None:
            state["train_loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitted:  # testing a checkpoint after fitting: nothing to resume
            return
        self._restored = state_dict  # applied at train start: the sanity check draws randomness
        self._earlier_s = float(state_dict.get("wall_time_s", 0.0))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @property
    def _train_loader(self) -> Any:
        trainer = getattr(self, "_trainer", None)
        loader = trainer.train_dataloader if trainer is not None else None
        return loader if hasattr(loader, "load_state_dict") else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_on_ctrl_c(trainer)
        state, self._restored = self._restored, None
        if state is None:
            return
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if "train_loader" in state and self._train_loader is not None:
            self._train_loader.load_state_dict(state["train_loader"])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitted = True

    def _stop_on_ctrl_c(self, trainer: pl.Trainer) -> None:
        """Ctrl-C (SIGINT) as SIGTERM: Lightning's handler, registered for this fit (and put
        back at its end), stops after the batch in flight. Only the main thread gets signals."""
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(on_sigterm):
            return

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            if self.stopped_by == signal.SIGINT and trainer.is_global_zero:
                raise KeyboardInterrupt  # pressed again: stop now, unsaved
            if self.stopped_by is None:
                log.warning(
                    "Ctrl-C: saving a resumable checkpoint after this batch "
                    "(press again to stop at once, unsaved)"
                )
            self.stopped_by = signal.SIGINT
            on_sigterm(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.stopped_by = self.stopped_by or signal.SIGTERM
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = Path(dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning(
            "%s: saved a resumable checkpoint, resume with ckpt_path=%s",
            signal.Signals(self.stopped_by).name,
            path,
        )
