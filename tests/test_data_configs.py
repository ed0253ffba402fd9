"""The data configs (conf/data/*.yaml on conf/data_base.yaml) as Hydra composes them: each
instantiates the DataModule's settings, and the root overrides reach the source."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data_formats import MEAN, STD, write_cifar10
from thaw.config import compose_config
from thaw.data.datamodule import ImageDataModule


def compose_data(
    tmp_path: Path, name: str, *overrides: str, data_dir: Path | None = None
) -> DictConfig:
    """The root config as Hydra composes it with `data=name` (the option's own keys on top of
    conf/data_base.yaml), `paths.data_dir` (default `tmp_path`) and `seed` set; `cfg.data` is the
    data group."""
    fixed = [f"data={name}", f"paths.data_dir={data_dir or tmp_path}", "seed=0"]
    return compose_config("train", [*fixed, *overrides], tmp_path / "run")


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist", "imagefolder", "tiny_imagenet"])
def test_data_configs_instantiate(tmp_path: Path, name: str) -> None:
    overrides = [f"data.root={tmp_path / 'images'}"] if name == "imagefolder" else []
    cfg = compose_data(tmp_path, name, *overrides)
    for key in ("mean", "std", "augment"):
        assert key not in cfg.data
    # The shared keys come from conf/data_base.yaml; the option's own keys override them.
    assert cfg.data._target_ == "thaw.data.settings.DataSettings.of"
    assert cfg.data.loader == "auto" and cfg.data.normalize == "backbone"
    assert cfg.data.val_fraction == 0.1 and cfg.data.seed == 0
    assert cfg.data.source._target_.startswith("thaw.data.sources.")
    own = {"image_size": 224, "batch_size": 32} if name == "imagefolder" else {}
    assert (cfg.data.image_size, cfg.data.batch_size) == (
        own.get("image_size"),
        own.get("batch_size", 128),
    )
    dm = ImageDataModule(instantiate(cfg.data), {"hflip": 0.5}, MEAN, STD)
    assert dm.source.root == dm.root
    expected_root = tmp_path / "images" if name == "imagefolder" else tmp_path / name
    assert dm.root == expected_root


def test_imagefolder_config_needs_a_root(tmp_path: Path) -> None:
    cfg = compose_data(tmp_path, "imagefolder")
    assert OmegaConf.is_missing(cfg.data, "root")


def test_data_root_override_reaches_the_source(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "mine", n_per_class=2)
    cfg = compose_data(
        tmp_path,
        "cifar10",
        f"data.root={tmp_path / 'mine'}",
        "data.source.download=false",
        "data.classes=[cat,dog]",
        "data.num_workers=0",
        data_dir=tmp_path / "unused",
    )
    dm = ImageDataModule(instantiate(cfg.data), None, MEAN, STD)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and len(dm.test_set) == 4
