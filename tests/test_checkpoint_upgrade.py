"""A checkpoint of thaw's first format (the training module's weights at the top of the
state_dict, the temperature inside the preprocessing, a data group that instantiated the
DataModule itself, configs without the newer keys) still loads, predicts, evaluates and resumes
exactly as the same checkpoint in today's format, through the one migration,
thaw.checkpoint.upgrade."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import FOLDER_RUN
from thaw.checkpoint import DIGEST_KEY, FORMAT, REJECTION_PREFIX, read_checkpoint
from thaw.config import compose_config
from thaw.evaluate import evaluate
from thaw.inference.metadata import ExportMetadata
from thaw.inference.predictor import Predictor
from thaw.models import load_trained
from thaw.postprocess import Postprocessing
from thaw.train import run


def first_format(checkpoint: dict) -> dict:
    """`checkpoint` as thaw wrote it before its format 2."""
    old = copy.deepcopy(checkpoint)
    weights = old["state_dict"].items()  # no rejection rule, and no digest, then
    old["state_dict"] = {
        k.removeprefix("model."): v for k, v in weights if not k.startswith(REJECTION_PREFIX)
    }
    record = old["thaw"]
    del record["format"], record[DIGEST_KEY]
    record["preprocessing"]["temperature"] = record.pop("postprocessing")["temperature"]
    config = record["config"]
    config["data"]["_target_"] = "thaw.data.datamodule.ImageDataModule"
    for group, key in (("data", "test_fraction"), ("data", "skip_bad_images")):
        del config[group][key]
    for key in ("family", "stem_stride"):
        del config["model"][key]
    return old


@pytest.fixture(scope="module")
def old_files(folder_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """folder_run's best and last checkpoints, written in the first format."""
    folder = tmp_path_factory.mktemp("first_format")
    files = {}
    for name in ("best", "last"):
        new = torch.load(folder_run / "checkpoints" / f"{name}.ckpt", weights_only=True)
        assert new["thaw"]["format"] == FORMAT and "model.head.1.weight" in new["state_dict"]
        files[name] = folder / f"{name}.ckpt"
        torch.save(first_format(new), files[name])
    return files


def test_a_first_format_checkpoint_loads_and_predicts_the_same(
    folder_run: Path, old_files: dict[str, Path], photo_folder: Path
) -> None:
    new, old = (
        load_trained(folder_run / "checkpoints" / "best.ckpt"),
        load_trained(old_files["best"]),
    )
    temperature = new.postprocessing.temperature
    assert old.postprocessing == Postprocessing(temperature) and temperature != 1.0
    assert old.preprocessing == new.preprocessing and old.classes == new.classes
    assert old.config == new.config  # the newer keys set to what the first format built
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    photos = sorted((photo_folder / "test").rglob("*.png"))
    answers = [Predictor.from_trained([m]).probabilities(photos) for m in (new, old)]
    assert torch.equal(*answers)
    upgraded = read_checkpoint(old_files["best"])["thaw"]
    assert upgraded["format"] == FORMAT and "temperature" not in upgraded["preprocessing"]


def test_a_first_format_checkpoint_evaluates_the_same(
    folder_run: Path, old_files: dict[str, Path], tmp_path: Path
) -> None:
    cfg = compose_config("eval", [f"ckpt_path={old_files['best']}", "report=false"], tmp_path)
    trained = json.loads((folder_run / "metrics.json").read_text())
    assert evaluate(cfg)["test/acc"] == trained["test/acc"]


def test_a_first_format_checkpoint_resumes_to_the_same_weights(
    folder_run: Path, old_files: dict[str, Path], photo_folder: Path, tmp_path: Path
) -> None:
    """One more epoch from each last.ckpt: Lightning hands the old file to the training task,
    whose on_load_checkpoint upgrades it before the weights load."""
    weights = []
    for name, last in (
        ("new", folder_run / "checkpoints" / "last.ckpt"),
        ("old", old_files["last"]),
    ):
        more = ["trainer.max_epochs=5", f"ckpt_path={last}", "test=false", "calibrate=false"]
        overrides = [*FOLDER_RUN, f"data.root={photo_folder}", "trainer.deterministic=true", *more]
        run(compose_config("train", overrides, tmp_path / name))
        resumed = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert resumed["epoch"] == 4  # the fifth epoch, counted from 0
        weights.append(resumed["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key


def test_a_file_exported_before_the_postprocessing_entry_keeps_its_temperature(
    folder_run: Path,
) -> None:
    model = load_trained(folder_run / "checkpoints" / "best.ckpt")
    layout, source = "float32_normalized", "best.ckpt"
    temperature = model.postprocessing.temperature  # and no rejection rule, then
    today = ExportMetadata(
        model.classes, model.preprocessing, Postprocessing(temperature), layout, source
    )
    pairs = today.to_strings()
    del pairs["thaw.postprocessing"]  # the first format: the temperature in the preprocessing
    pairs["thaw.preprocessing"] = json.dumps(
        {**model.preprocessing.to_dict(), "temperature": temperature}
    )
    assert ExportMetadata.from_strings(pairs, "model.onnx") == today
