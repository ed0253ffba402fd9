"""Configs composed in process, as `python train.py ...` composes them, but tiny and offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from data_formats import write_fashion_mnist
from thaw.config import compose_config

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")

# Small and fast: random init (no downloads), few images, CPU, no progress bars.
TINY = [
    "model.weights=null",
    "data.num_workers=0",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "++callbacks.rich_progress_bar=null",
]


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
