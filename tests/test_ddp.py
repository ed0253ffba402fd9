"""Two CPU processes on gloo: after the unfreeze the backbone trains and stays identical across
ranks (Lightning's BackboneFinetuning never syncs groups that were frozen when DDP wrapped)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist

from classifiers import classifier, task
from conftest import PREPROCESSING, TINY, offline_fmnist
from test_resume import NoisyImages
from thaw.data.resumable import ResumableLoader
from thaw.finetune import FreezeUnfreeze, TwoPhase, schedulers
from thaw.models import create_backbone
from thaw.resume import ResumeState
from thaw.semi.stream import StreamPositions

ROOT = Path(__file__).resolve().parents[1]


class GatherBackbones(pl.Callback):
    """At the end of every epoch, each rank's backbone, gathered on every rank."""

    def __init__(self) -> None:
        self.per_epoch: list[list[torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.model.backbone.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        self.per_epoch.append(gathered)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            torch.save(self.per_epoch, trainer.default_root_dir + "/backbones.pt")


@pytest.fixture
def file_system_sharing():
    """Spawned workers receive the model through shared memory; this sandbox refuses to resize
    shared-memory file descriptors (torch's default way), so share through files instead."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(previous)


@pytest.mark.usefixtures("file_system_sharing")
def test_ddp_spawn_syncs_the_thawed_backbone_across_two_cpu_processes(quiet_trainer, tmp_path):
    torch.manual_seed(0)
    model = task(
        classifier(create_backbone("resnet18", weights=None), ["a", "b", "c"], PREPROCESSING),
        optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
        finetune=TwoPhase(freeze_epochs=1),
        scheduler=partial(schedulers.constant),
    )
    initial = torch.cat([p.detach().flatten() for p in model.model.backbone.parameters()])
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp_spawn_find_unused_parameters_true",
        use_distributed_sampler=False,
        max_epochs=2,
        default_root_dir=str(tmp_path),
        callbacks=[FreezeUnfreeze(model.finetune), ResumeState(), GatherBackbones()],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, ResumableLoader(NoisyImages(32), seed=1, batch_size=4))

    (frozen_epoch, thawed_epoch) = torch.load(tmp_path / "backbones.pt", weights_only=True)
    assert torch.equal(frozen_epoch[0], initial) and torch.equal(frozen_epoch[1], initial)
    assert not torch.equal(thawed_epoch[0], initial)  # the backbone trained after the unfreeze
    assert torch.equal(thawed_epoch[0], thawed_epoch[1])  # and both ranks hold the same weights


def test_each_rank_trains_on_its_own_half_of_every_epoch(monkeypatch):
    loader = ResumableLoader(NoisyImages(10), seed=1, batch_size=2)
    monkeypatch.setattr("thaw.data.resumable.rank_and_world", lambda: (0, 2))
    rank0 = [i for i, _ in loader.sampler]
    monkeypatch.setattr("thaw.data.resumable.rank_and_world", lambda: (1, 2))
    rank1 = [i for i, _ in loader.sampler]
    assert len(rank0) == len(rank1) == len(loader.sampler) == 5
    assert sorted(rank0 + rank1) == list(range(10))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=400,
    )


def test_each_rank_takes_its_own_stretch_of_the_unlabeled_stream(monkeypatch):
    """Two ranks' unlabeled images at a step are the one-process stream's two steps: disjoint,
    and together all of it."""
    positions = StreamPositions(size=12, seed=1, batch_size=3)
    alone = [positions.step(step) for step in range(4)]
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr("thaw.semi.stream.rank_and_world", lambda rank=rank: (rank, 2))
        ranks.append([positions.step(step) for step in range(2)])
    assert ranks[0] == [alone[0], alone[2]] and ranks[1] == [alone[1], alone[3]]


def test_cli_ddp_single_run_and_ddp_spawn_multirun_both_work(fmnist_root, tmp_path):
    """The single DDP run is semi-supervised too: FixMatch's stream and loss under DDP."""
    tiny = [*TINY, *offline_fmnist(fmnist_root), "finetune=full", "trainer.max_epochs=1"]
    tiny.append("data.batch_size=8")
    semi = ["semi=fixmatch", "semi.mu=1", "semi.start_epoch=0"]
    semi += ["data.samples_per_class=4", "data.unlabeled_per_class=3"]
    single = cli("trainer=ddp", *tiny, *semi, f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    report = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert sum(map(sum, report["test/confusion_matrix"])) == 40  # not summed over the 2 ranks
    assert report["data/unlabeled"] == 30

    sweep = cli(
        "-m",
        "trainer=ddp_spawn",
        *tiny,
        "optimizer.lr=1e-3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    # One run dir for the one job: the sweep ran once, not once per rank.
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0"]
    report = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    assert sum(map(sum, report["test/confusion_matrix"])) == 40  # each test image once
