"""Configs composed in process, as `python train.py ...` composes them, but tiny and offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
from omegaconf import DictConfig

from data_formats import write_fashion_mnist
from thaw.config import SILENT, compose_config
from thaw.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from thaw.preprocess import Preprocessing

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")

# Small and fast: random init (no downloads), few images, CPU, no progress bars.
TINY = [
    "model.weights=null",
    "data.num_workers=0",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    *SILENT,
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
