"""Configs composed in process, as `python train.py ...` composes them, but tiny and offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from PIL import Image

from data_formats import write_fashion_mnist
from thaw.config import SILENT, compose_config
from thaw.data.sources.fashion_mnist import CLASSES, FashionMNIST
from thaw.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from thaw.preprocess import Preprocessing
from thaw.train import run

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on this 2-core machine: one thread each, and the
    # same for the processes the tests start (the README has the timings that chose this).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

# Small and fast: random init (no downloads), few images, CPU, no progress bars.
TINY = [
    "model.weights=null",
    "data.num_workers=0",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "report=false",  # the report has its own tests, on `folder_run`'s
    *SILENT,
]

# Learning from random init on a few hundred real photos in three epochs: the recipe of the
# tests that train on real Fashion-MNIST.
REAL_RECIPE = [
    "data.batch_size=32",
    "data.eval_batch_size=500",
    "augment=none",
    "finetune=full",
    "finetune.backbone_lr_ratio=1.0",
    "scheduler=onecycle",
    "optimizer.lr=3e-3",
    "trainer.max_epochs=3",
]

# What a classifier built in a test saw in training: 28 px RGB, ImageNet statistics.
PREPROCESSING = Preprocessing(input_size=28, mean=IMAGENET_MEAN, std=IMAGENET_STD)

# A Trainer for tests that build one by hand: CPU, nothing written, nothing shown.
_QUIET_TRAINER = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's caches (thaw's record of image files that decode) in a folder of this
    session's, which the processes tests start inherit: tests neither read nor fill the real
    ones."""
    cache = tmp_path_factory.mktemp("user_cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def quiet_trainer() -> Callable[..., pl.Trainer]:
    """quiet_trainer(max_epochs=2, ...): a pl.Trainer with the quiet settings; keyword
    arguments add to them or override them."""
    return lambda **kwargs: pl.Trainer(**{**_QUIET_TRAINER, **kwargs})


def offline_fmnist(root: Path) -> list[str]:
    """Fashion-MNIST read from `root` only: never the system copy, never the network."""
    return [
        f"data.root={root}",
        "data.source.download=false",
        "data.source.system_dir=/nonexistent",
    ]


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST idx files in the real format: 10 classes, 8 train and 4 test images each."""
    root = tmp_path_factory.mktemp("fashion_mnist")
    write_fashion_mnist(root, n_train=80, n_test=40)
    return root


@pytest.fixture
def train_config(tmp_path: Path, fmnist_root: Path) -> Callable[..., DictConfig]:
    """train_config("finetune=full", ..., run="a"): a tiny composed training config, on generated
    Fashion-MNIST files unless the overrides choose other data."""

    def make(*overrides: str, run: str = "run") -> DictConfig:
        data = [] if any(o.startswith("data=") for o in overrides) else offline_fmnist(fmnist_root)
        return compose_config("train", [*TINY, *data, *overrides], tmp_path / run)

    return make


# The classes, and images per class and split, of the `folder_run` photos.
FOLDER_CLASSES = ["Trouser", "Sneaker", "Bag"]
FOLDER_SPLITS = {"train": 40, "val": 12, "test": 12}


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Fashion-MNIST photos as PNG files in root/{train,val,test}/<class>/: a shop's
    folder of product photos, offline (Debian's dataset-fashion-mnist)."""
    assert REAL_FMNIST.is_dir(), "install the data: apt-get install dataset-fashion-mnist"
    splits = FashionMNIST(REAL_FMNIST, download=False, system_dir=None).load()
    root = tmp_path_factory.mktemp("photos")
    for label, name in enumerate(CLASSES):
        if name not in FOLDER_CLASSES:
            continue
        images = splits.train.images[splits.train.labels == label]
        start = 0
        for split, count in FOLDER_SPLITS.items():
            folder = root / split / name.replace("/", "_")
            folder.mkdir(parents=True)
            for i, image in enumerate(images[start : start + count]):
                Image.fromarray(image[0].numpy(), "L").save(folder / f"{i:03d}.png")
            start += count
    return root


@pytest.fixture(scope="session")
def photo_shards(photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`photo_folder` as litdata shards (scripts/make_shards.py) at 28 px: data=streaming's."""
    out = tmp_path_factory.mktemp("shards") / "photos"
    make_shards = load_script("make_shards")
    make_shards.main(
        ["data=imagefolder", f"data.root={photo_folder}", "data.image_size=28", f"out={out}"]
        + ["workers=2", "chunk_bytes=256KB"]
    )
    return out


# `folder_run`'s training, on the photos of `photo_folder` (data.root).
FOLDER_RUN = [
    *TINY,
    "data=imagefolder",
    "data.image_size=28",
    "augment=none",
    "finetune=full",
    "finetune.backbone_lr_ratio=1.0",
    "optimizer.lr=3e-3",
    "trainer.max_epochs=4",
    "logger=none",
    "++callbacks.batch_preview=null",
    "report=true",
]


@pytest.fixture(scope="session")
def folder_run(photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run dir of a tiny model trained on `photo_folder` (checkpoints/best.ckpt,
    metrics.json, .hydra/), shared by the tests of what comes after training."""
    run_dir = tmp_path_factory.mktemp("folder_run") / "run"
    run(compose_config("train", [*FOLDER_RUN, f"data.root={photo_folder}"], run_dir))
    return run_dir


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module, registered as imports are (its dataclasses look themselves
    up), so a test calls its main() in process."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_cli(
    script: str, args: list[str], run_dir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python <script>.py args` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, str(REPO / f"{script}.py"), *args, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def run_cli_batch(commands: dict[str, dict], folder: Path) -> dict[str, dict]:
    """Many command lines through thaw's CLI in one process (tests/cli_batch.py), each
    {"script", "args"[, "task"]} by name; each one's answer (exit status, stderr) by name."""
    given, taken = folder / "commands.json", folder / "answers.json"
    folder.mkdir(parents=True, exist_ok=True)
    given.write_text(json.dumps(commands))
    batch = subprocess.run(
        [sys.executable, str(REPO / "tests" / "cli_batch.py"), str(given), str(taken)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert batch.returncode == 0, batch.stderr[-3000:]
    return json.loads(taken.read_text())
