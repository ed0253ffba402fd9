"""A run stopped anywhere (by SIGTERM, as a cluster pre-empts) and resumed ends bit-identical to
one never stopped: weights, per-group learning rates and metrics."""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

import thaw.progress.trainer
from classifiers import classifier, task
from conftest import PREPROCESSING
from test_semi import SEMI
from thaw.data.resumable import EpochSampler, ResumableLoader
from thaw.finetune import FreezeUnfreeze, TwoPhase, schedulers
from thaw.models import create_backbone
from thaw.models.task import ClassificationTask
from thaw.resume import ResumeState, TrainingStopped
from thaw.train import run

STEPS_PER_EPOCH = 3  # 24 images, batches of 8
EPOCHS = 3


class NoisyImages(Dataset):
    """Random images whose 'augmentation' draws from the global RNG, as v2 transforms do."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(3)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i] + 0.5 * torch.randn(3, 32, 32), self.labels[i]


class RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = [g["lr"] for g in trainer.optimizers[0].param_groups]


class SigtermAt(pl.Callback):
    """Sends this process SIGTERM after `step` optimizer steps, as a scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def new_model(init_seed: int) -> ClassificationTask:
    torch.manual_seed(init_seed)
    backbone = create_backbone("resnet18", weights=None)
    return task(
        classifier(backbone, ["a", "b", "c"], PREPROCESSING, head_dropout=0.5),
        optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
        finetune=TwoPhase(freeze_epochs=1, unfreeze_groups=2),
        scheduler=partial(schedulers.cosine, warmup_epochs=0.5),
    )


def fit(
    quiet_trainer: Callable[..., pl.Trainer],
    tmp: Path,
    *callbacks: pl.Callback,
    ckpt_path: str | None = None,
    init_seed: int = 0,
    make_model: Callable[[int], ClassificationTask] = new_model,
):
    """Fit `make_model(init_seed)` for EPOCHS epochs of STEPS_PER_EPOCH steps, two-phase,
    checkpointing into `tmp`; returns the task, the trainer and its per-step LRs."""
    model = make_model(init_seed)
    recorder = RecordLR()
    trainer = quiet_trainer(
        max_epochs=EPOCHS,
        deterministic=True,
        default_root_dir=tmp,
        callbacks=[
            FreezeUnfreeze(model.finetune),
            ResumeState(),
            recorder,
            *callbacks,
            ModelCheckpoint(dirpath=tmp / "checkpoints", save_last=True),
        ],
        enable_checkpointing=True,
        num_sanity_val_steps=0,
    )
    train = ResumableLoader(NoisyImages(), seed=5, batch_size=8)
    val = DataLoader(NoisyImages(12), batch_size=12)
    torch.manual_seed(1)  # the global stream (dropout, augmentation) starts the same in both
    trainer.fit(model, train, val, ckpt_path=ckpt_path, weights_only=True)
    return model, trainer, recorder


@pytest.fixture(scope="module")
def uninterrupted(quiet_trainer, tmp_path_factory):
    return fit(quiet_trainer, tmp_path_factory.mktemp("whole"))


@pytest.mark.parametrize(
    "stop_step",
    [1, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 2],
    ids=["mid-phase-1", "at-the-unfreeze", "mid-phase-2"],
)
def test_resume_after_sigterm_matches_the_uninterrupted_run(
    quiet_trainer, uninterrupted, tmp_path, stop_step
):
    whole_model, whole_trainer, whole_lrs = uninterrupted
    with pytest.raises(SIGTERMException):
        fit(quiet_trainer, tmp_path, SigtermAt(stop_step))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stop_step

    model, trainer, lrs = fit(quiet_trainer, tmp_path, ckpt_path=str(last), init_seed=99)

    for (name, a), b in zip(
        whole_model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert trainer.global_step == whole_trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    assert lrs.lrs == {s: v for s, v in whole_lrs.lrs.items() if s >= stop_step}
    for key in ("val/acc", "val/acc_best", "val/loss", "train/loss_epoch"):
        assert trainer.callback_metrics[key] == whole_trainer.callback_metrics[key], key


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_skips_exactly():
    sampler = EpochSampler(10, seed=1)
    first = list(sampler)
    assert list(sampler) == first and sorted(i for i, _ in first) == list(range(10))
    sampler.set_epoch(1)
    second = list(sampler)
    assert [i for i, _ in second] != [i for i, _ in first]
    assert {s for _, s in second}.isdisjoint({s for _, s in first})  # fresh augmentation seeds
    sampler.skip = 4
    assert list(sampler) == second[4:] and list(sampler) == second  # a skip applies once


def test_loader_state_resumes_only_the_epoch_it_was_saved_in():
    loader = ResumableLoader(NoisyImages(), seed=5, batch_size=8)
    batches = list(loader)
    loader.load_state_dict({"epoch": 0, "batches": 2, "seed": 5})
    rest = list(loader)
    assert len(rest) == 1 and torch.equal(rest[0][0], batches[2][0])
    loader.load_state_dict({"epoch": 0, "batches": 3, "seed": 5})
    loader.sampler.set_epoch(1)
    assert len(list(loader)) == 3  # a finished epoch's state does not cut the next epoch short


EMA = ["callbacks=ema", "callbacks.ema.decay=0.9"]


# The photo folder's 120 training images, 8 steps an epoch.
PHOTOS = ["data.image_size=28", "data.batch_size=16"]


def data_path(loader: str, request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """The overrides of a data path: the photo folder through data.cache, its shards streamed,
    or generated Fashion-MNIST on the path `loader` names."""
    if loader == "cache":
        folder = request.getfixturevalue("photo_folder")
        cache = [f"data.cache={tmp_path / 'cache'}", "data.loader=device"]
        return ["data=imagefolder", f"data.root={folder}", *cache, *PHOTOS]
    if loader == "streaming":  # with loader workers: litdata's state is kept per worker
        shards = request.getfixturevalue("photo_shards")
        return ["data=streaming", f"data.root={shards}", "data.num_workers=2", *PHOTOS]
    return [f"data.loader={loader}"]


@pytest.mark.parametrize(
    ("loader", "extra", "stop_step", "steps"),
    [
        ("device", EMA, 7, 10),  # 5 steps an epoch: mid-phase-2
        ("dataloader", [], 7, 10),
        ("device", [*SEMI, *EMA], 4, 6),  # 3 steps an epoch: the first with unlabeled images
        ("dataloader", SEMI, 4, 6),
        ("cache", EMA, 11, 16),  # image files decoded into data.cache, then the device path
        ("streaming", EMA, 11, 16),  # litdata shards, its loader state saved and restored
    ],
    ids=[
        "device-ema",
        "dataloader",
        "device-ema-fixmatch",
        "dataloader-fixmatch",
        "cache-ema",
        "streaming-ema",
    ],
)
def test_a_composed_run_stopped_by_sigterm_resumes_to_the_same_weights(
    train_config, request, tmp_path, loader, extra, stop_step, steps
):
    """The whole stack: the DataModule's loader on every path (batched augmentation on the
    device, per image in a DataLoader, image files through the decoded cache, streamed litdata
    shards), batch mixup, an EMA of the weights, and FixMatch's unlabeled stream with its
    warm-up's best val/acc."""
    data = data_path(loader, request, tmp_path)
    common = [
        *data,
        *extra,
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "test=false",
        "augment=mixup",
        "finetune.freeze_epochs=1",
        "model.head_dropout=0.5",
    ]
    run(train_config(*common, run="whole"))
    sigterm = ["++callbacks.sigterm._target_=test_resume.SigtermAt"]
    with pytest.raises(TrainingStopped):
        run(train_config(*common, *sigterm, f"++callbacks.sigterm.step={stop_step}", run="stopped"))
    run(train_config(*common, "ckpt_path=last", run="stopped"))

    def final(name: str) -> tuple[dict[str, torch.Tensor], dict]:
        path = train_config(run=name).paths.output_dir + "/checkpoints/last.ckpt"
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["global_step"] == steps  # last.ckpt is the last step, improved or not
        assert ("current_model_state" in checkpoint) == (EMA[0] in extra)  # EMA: raw weights
        raw = checkpoint.get("current_model_state", {})
        warmup = {k: v for k, v in checkpoint["callbacks"].items() if k.startswith("WarmupCheck")}
        assert bool(warmup) == (SEMI[0] in extra)
        return checkpoint["state_dict"] | {f"raw.{k}": v for k, v in raw.items()}, warmup

    (whole, whole_warmup), (resumed, resumed_warmup) = final("whole"), final("stopped")
    assert whole.keys() == resumed.keys() and whole_warmup == resumed_warmup
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_the_epoch_a_run_resumes_in_is_timed_from_the_resume(train_config, monkeypatch, caplog):
    """Lightning skips on_train_epoch_start for the epoch it resumes in the middle of. Its log line
    once timed it from the clock's zero (the machine's uptime): `0 img/s | 15h28m/epoch`."""
    ticks = itertools.count(start=1_000_000.0, step=0.01)  # a clock far from zero, as uptime is
    monkeypatch.setattr(
        thaw.progress.trainer, "time", SimpleNamespace(perf_counter=lambda: next(ticks))
    )
    log_progress = [
        "++callbacks.progress={_target_:thaw.progress.trainer.LogProgress}",
        "++trainer.enable_progress_bar=true",
        "trainer.max_epochs=2",
        "test=false",
        "calibrate=false",
    ]
    sigterm = ["++callbacks.sigterm._target_=test_resume.SigtermAt", "++callbacks.sigterm.step=7"]
    with pytest.raises(TrainingStopped):
        run(train_config(*log_progress, *sigterm))  # 5 steps an epoch: in the second
    with caplog.at_level(logging.INFO, logger="thaw.progress"):
        run(train_config(*log_progress, "ckpt_path=last"))
    (line,) = [m for m in caplog.messages if m.startswith("epoch 2/2 | step 10")]
    per_epoch = line.split(" | ")[-2]
    assert per_epoch.endswith("/epoch") and "h" not in per_epoch.removesuffix("/epoch"), line
    assert " | 0 img/s | " not in line, line
