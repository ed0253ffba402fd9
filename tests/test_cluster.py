"""Cluster runs through hydra-submitit-launcher, tested with its local executor (submitit_slurm
runs the same job function under SLURM): a job stopped by SIGTERM, as a pre-empted job is,
continues with ckpt_path=auto to the weights of a job never stopped, and relaunching the same
2-job multirun, as a requeue does, completes it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import TINY, offline_fmnist

ROOT = Path(__file__).resolve().parents[1]
# Deterministic, and enough steps for a stop in the middle: 72 training images in batches of 8.
SETTINGS = [
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "data.batch_size=8",
    "calibrate=false",
]
# Two jobs of the same run: job 0 runs its 18 steps; job 1 gets SIGTERM after step 13.
JOBS = [
    "seed=1",
    "ckpt_path=auto",
    "++callbacks.sigterm._target_=test_resume.SigtermAt",
    "++callbacks.sigterm.step=1000,13",
]


def multirun_command(fmnist_root: Path, sweep_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep_dir}",
        *TINY,
        *offline_fmnist(fmnist_root),
        *SETTINGS,
        *JOBS,
    ]


# The SIGTERM-sending callback lives in the tests: the job processes import it from there. The two
# local jobs share this machine's cores: one thread each (two jobs of 2 threads on 2 cores ran
# their 18 steps in 21 s instead of 3).
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}


def ended(pid: int) -> bool:
    """The process is gone, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 18  # 2 epochs of 9 steps
    return checkpoint["state_dict"]


def test_a_sigtermed_job_continues_with_ckpt_path_auto_and_the_multirun_completes(
    fmnist_root, tmp_path
):
    sweep_dir = tmp_path / "sweep"
    command = multirun_command(fmnist_root, sweep_dir)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        # Once both job processes have ended, submitit would wait 15 s more for the result the
        # stopped job never wrote before it failed the multirun: stop waiting there.
        deadline = time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline:
            folders = sweep_dir.glob(".submitit/*/")  # one per job, named by its process id
            jobs = [int(p.name) for p in folders if p.name.isdigit()]
            if len(jobs) == 2 and all(ended(pid) for pid in jobs):
                break
            time.sleep(0.5)
        first.kill()
        first.wait()
    whole_dir, run_dir = sweep_dir / "0", sweep_dir / "1"
    assert (whole_dir / "metrics.json").is_file(), (tmp_path / "first.log").read_text()[-3000:]
    assert not (run_dir / "metrics.json").exists()
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 13  # saved on SIGTERM, after the batch in flight

    requeued = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "ckpt_path=auto: resuming from" in (run_dir / "train.log").read_text()
    with open(sweep_dir / "sweep.csv") as file:
        assert [row["state"] for row in csv.DictReader(file)] == ["COMPLETE", "COMPLETE"]
    whole, continued = final_weights(whole_dir), final_weights(run_dir)
    assert whole.keys() == continued.keys()
    for key in whole:
        assert torch.equal(whole[key], continued[key]), key
