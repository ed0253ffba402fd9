"""DataModules for tests: the data group's own defaults (conf/data_base.yaml, the one source of
them), with the settings a test gives, and no loader workers unless it asks for them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from thaw.config import config_dir
from thaw.data.datamodule import ImageDataModule
from thaw.data.settings import DataSettings
from thaw.data.sources.base import Source
from thaw.preprocess import Preprocessing

# What conf/data_base.yaml leaves to the data option or to interpolation.
_NOT_DEFAULTS = ("_target_", "source", "root", "seed")


def data_settings(source: Source, **values: Any) -> DataSettings:
    """DataSettings of `source`: the YAML defaults, then `values`."""
    base = OmegaConf.to_container(OmegaConf.load(config_dir() / "data_base.yaml"))
    defaults = {k: v for k, v in base.items() if k not in _NOT_DEFAULTS}
    return DataSettings.of(
        source, **{**defaults, "root": None, "seed": None, "num_workers": 0, **values}
    )


def make_datamodule(
    source: Source,
    augment: Mapping[str, Any] | None,
    mean: Sequence[float],
    std: Sequence[float],
    preprocessing: Preprocessing | None = None,
    test_only: bool = False,
    **values: Any,
) -> ImageDataModule:
    """The DataModule of `source` with the data settings `values` (see `data_settings`)."""
    return ImageDataModule(
        data_settings(source, **values), augment, mean, std, preprocessing, test_only
    )
