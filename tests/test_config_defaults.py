"""One source of defaults: the YAML. A settings class either has no defaults (the data group's
DataSettings, the model module and its training task take every config value from the config)
or has exactly the YAML's, so code built without Hydra behaves as a run does."""

from __future__ import annotations

import dataclasses
import inspect

from omegaconf import OmegaConf

from thaw.config import config_dir
from thaw.data.augment.options import AugmentOptions
from thaw.data.settings import DataSettings, SplitSettings
from thaw.export import export_model
from thaw.models.network import ImageClassifier
from thaw.models.task import ClassificationTask
from thaw.serving.state import ServeSettings


def yaml(name: str) -> dict:
    values = OmegaConf.to_container(OmegaConf.load(config_dir() / name))
    return {k: v for k, v in values.items() if k != "defaults"}


def defaults(cls: type) -> dict:
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def test_the_data_settings_have_no_python_defaults() -> None:
    assert defaults(DataSettings) == {} and defaults(SplitSettings) == {}
    flat = {f.name for f in dataclasses.fields(DataSettings) if f.name not in ("source", "splits")}
    every = flat | {f.name for f in dataclasses.fields(SplitSettings)}
    assert every == set(yaml("data_base.yaml")) - {"_target_", "source"}  # each key, a field


def test_augment_and_serve_defaults_are_the_yamls() -> None:
    assert defaults(AugmentOptions) == yaml("augment/none.yaml")
    served = yaml("serve.yaml")
    assert defaults(ServeSettings) == {k: served[k] for k in defaults(ServeSettings)}


def test_the_model_and_its_task_take_their_config_values_without_defaults() -> None:
    model = inspect.signature(ImageClassifier).parameters
    task = inspect.signature(ClassificationTask).parameters
    for name in ("head_dropout", "config"):
        assert model[name].default is inspect.Parameter.empty, name
    for name in ("label_smoothing", "class_weights", "focal_gamma", "optimizer", "finetune"):
        assert task[name].default is inspect.Parameter.empty, name


def test_export_defaults_are_the_yamls() -> None:
    exported = yaml("export.yaml")
    for name, parameter in inspect.signature(export_model).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            assert parameter.default == exported[name], name
