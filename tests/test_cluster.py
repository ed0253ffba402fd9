"""Cluster runs through hydra-submitit-launcher, tested with its local executor (submitit_slurm
runs the same job function under SLURM): jobs complete, and a job stopped by SIGTERM, as a
pre-empted job is, continues with ckpt_path=auto to the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
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


def train(
    fmnist_root: Path, *overrides: str, multirun: bool = False
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *(["-m"] if multirun else []),
        *TINY,
        *offline_fmnist(fmnist_root),
        *SETTINGS,
        *overrides,
    ]
    # The SIGTERM-sending callback lives in the tests: the job process imports it from there.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 18  # 2 epochs of 9 steps
    return checkpoint["state_dict"]


def test_a_job_stopped_by_sigterm_continues_with_ckpt_path_auto(fmnist_root, tmp_path):
    """Two jobs of the same run through submitit: job 0 is never stopped; job 1 gets SIGTERM
    after step 13 and fails, as a pre-empted job does. Relaunched with ckpt_path=auto in its
    run dir, as a requeue relaunches it, job 1 ends where job 0 did."""
    sweep_dir = tmp_path / "sweep"
    stopped = train(
        fmnist_root,
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep_dir}",
        "seed=1",
        "ckpt_path=auto",
        "++callbacks.sigterm._target_=test_resume.SigtermAt",
        "++callbacks.sigterm.step=1000,13",  # 18 steps in all: job 0 runs to the end
        multirun=True,
    )
    assert stopped.returncode != 0, stopped.stderr[-2000:]  # job 1 ended with 143
    whole_dir, run_dir = sweep_dir / "0", sweep_dir / "1"
    assert (whole_dir / "metrics.json").is_file() and not (run_dir / "metrics.json").exists()
    assert len(list(sweep_dir.glob(".submitit/*/*_log.out"))) == 2  # each its own submitit job
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 13

    requeued = train(fmnist_root, f"hydra.run.dir={run_dir}", "seed=1", "ckpt_path=auto")
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "ckpt_path=auto: resuming from" in (run_dir / "train.log").read_text()
    assert (run_dir / "metrics.json").is_file()
    whole, continued = final_weights(whole_dir), final_weights(run_dir)
    assert whole.keys() == continued.keys()
    for key in whole:
        assert torch.equal(whole[key], continued[key]), key
