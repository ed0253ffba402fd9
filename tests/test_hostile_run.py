"""A training run under accident: no run is lost silently, and two never mix.

An unwritable run dir is refused before any data is read; a checkpoint that cannot be saved stops
the run at once, by name; a run dir held by a live training is refused (exit 2, its files
untouched) and one left by a killed training is taken over, with the temporary files of its cut
save removed; Ctrl-C saves a resumable checkpoint as SIGTERM does; the wall time sums across
resumes; and a checkpoint whose weights changed on disk is refused, by name, unless asked.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import run_cli
from thaw.checkpoint import ALLOW_MISMATCH_ENV, read_checkpoint, save_atomically
from thaw.checkpoint_io import CheckpointSaveError, DurableCheckpointIO
from thaw.errors import UserError
from thaw.resume import TrainingStopped
from thaw.run_dir import LOCK_FILE, RunDirInUseError
from thaw.train import run, task

STEPS_PER_EPOCH = 5  # conftest's generated Fashion-MNIST: 80 train images, batches of 16
HOLD = """
import sys, time
from pathlib import Path
from thaw.run_dir import acquire
acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


class SignalAt(pl.Callback):
    """Sends this process `signum` after `step` optimizer steps, as a user or scheduler would."""

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class BreakCheckpointsAt(pl.Callback):
    """Replaces checkpoints/ with a file before epoch `epoch`'s save, as a full or read-only disk
    fails a save for a user who is not root; counts the epochs that started."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch, self.started = epoch, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            folder = Path(trainer.checkpoint_callback.dirpath)
            if folder.is_dir():
                shutil.rmtree(folder)
            folder.write_text("not a folder")


def hold_run_dir(run_dir: Path) -> subprocess.Popen:
    """Another process holding `run_dir`, as a live training does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_an_unwritable_run_dir_is_refused_before_any_data_is_read(train_config, tmp_path):
    (tmp_path / "file").write_text("")
    cfg = train_config("data=imagefolder", "data.root=/nonexistent/photos")
    cfg.paths.output_dir = str(tmp_path / "file" / "run")
    with pytest.raises(UserError, match="hydra.run.dir=.*file/run cannot be written: .* is a file"):
        run(cfg)

    cfg = train_config("data=imagefolder", "data.root=/nonexistent/photos")
    Path(cfg.paths.output_dir).mkdir(parents=True)
    (Path(cfg.paths.output_dir) / "checkpoints").write_text("")
    with pytest.raises(UserError, match="callbacks.model_checkpoint.dirpath=.* is a file"):
        run(cfg)


def test_a_failed_checkpoint_save_stops_the_run_at_once_naming_the_file(train_config):
    breaker = BreakCheckpointsAt(epoch=0)
    cfg = train_config("trainer.max_epochs=3")
    with pytest.raises(CheckpointSaveError) as err:
        run(cfg, callbacks=[breaker])
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    assert f"could not save checkpoint {folder}/" in str(err.value)
    assert "File exists" in str(err.value) and "ckpt_path=auto" in str(err.value)
    assert breaker.started == 1  # not one epoch more trained unsaved


def test_a_save_the_os_refuses_is_an_error_naming_file_and_reason():
    """A PermissionError, which Lightning's own writer swallows where the checkpoint folder is
    on the temp dir's disk (here /sys, which refuses root too)."""
    path = Path("/sys/thaw-test.ckpt")
    with pytest.raises(CheckpointSaveError, match=f"could not save checkpoint {path}: Permission"):
        DurableCheckpointIO().save_checkpoint({"weights": torch.zeros(2)}, path)


def test_a_live_run_dir_is_refused_and_a_dead_ones_is_taken_over(train_config, caplog):
    cfg = train_config("trainer.max_epochs=1", "finetune=linear_probe", "test=false")
    run_dir = Path(cfg.paths.output_dir)
    holder = hold_run_dir(run_dir)
    try:
        with pytest.raises(RunDirInUseError, match=f"pid {holder.pid} on "):
            run(cfg)
    finally:
        holder.kill()
        holder.wait()
    temporary = run_dir / "checkpoints" / ".last.ckpt.cut0ff.tmp"  # a save cut off by kill -9
    temporary.parent.mkdir()
    temporary.write_bytes(b"half a checkpoint")
    with caplog.at_level("WARNING"):
        run(cfg)
    assert f"ended without releasing it (pid {holder.pid} on " in caplog.text
    assert "Removed 1 temporary files" in caplog.text and not temporary.exists()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / LOCK_FILE).read_text() == ""  # let go at the end


def test_the_command_line_refuses_a_live_run_dir_before_writing_to_it(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the live run's config\n")
    holder = hold_run_dir(run_dir)
    try:
        result = run_cli("train", ["model.weights=null"], run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    assert f"hydra.run.dir={run_dir} is in use by a training that is still running" in (
        result.stderr
    )
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the live run's config\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", LOCK_FILE]


def test_ctrl_c_saves_a_resumable_checkpoint_and_exits_130(train_config):
    stopped = train_config(
        "trainer.max_epochs=2",
        "++callbacks.sigint._target_=test_hostile_run.SignalAt",
        "++callbacks.sigint.step=7",
    )
    with pytest.raises(SystemExit) as exit_:
        task(stopped)
    assert exit_.value.code == 130
    last = Path(stopped.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 7  # the batch in flight ended
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after fit


def test_the_wall_time_sums_across_resumes(train_config):
    cfg = train_config("trainer.max_epochs=2", "calibrate=false")
    with pytest.raises(TrainingStopped):
        run(cfg, callbacks=[SignalAt(7, signal.SIGTERM)])
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ResumeState")]
    assert 0 < state["wall_time_s"] < 600
    state["wall_time_s"] = 10_000.0  # as if the stopped run had trained for hours
    save_atomically(checkpoint, last)
    metrics = run(train_config("trainer.max_epochs=2", "calibrate=false", "ckpt_path=last"))
    assert 10_000 < metrics["train/wall_time_s"] < 10_600


def test_a_checkpoint_whose_weights_changed_is_refused_by_name(folder_run, tmp_path, caplog):
    copy = tmp_path / "best.ckpt"
    checkpoint = torch.load(folder_run / "checkpoints" / "best.ckpt", weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if k.startswith("model.head"))
    weights = checkpoint["state_dict"][name]
    weights.view(-1).view(torch.int32)[0] ^= 1  # one flipped bit
    torch.save(checkpoint, copy)  # torch loads it fine

    with pytest.raises(UserError, match=f"checkpoint {copy}: its weights do not match"):
        read_checkpoint(copy)
    os.environ[ALLOW_MISMATCH_ENV] = "1"
    try:
        with caplog.at_level("WARNING"):
            loaded = read_checkpoint(copy)
    finally:
        del os.environ[ALLOW_MISMATCH_ENV]
    assert torch.equal(loaded["state_dict"][name], weights)
    assert "Loading it anyway" in caplog.text
    # Another thaw re-saving it (a postprocessing update) stamps the digest of what it holds.
    save_atomically(loaded, copy)
    read_checkpoint(copy)


def test_checkpoints_saved_in_training_carry_their_digest(folder_run):
    for name in ("best.ckpt", "last.ckpt"):
        record = torch.load(folder_run / "checkpoints" / name, weights_only=True)["thaw"]
        assert len(record["weights_sha256"]) == 64
        read_checkpoint(folder_run / "checkpoints" / name)
