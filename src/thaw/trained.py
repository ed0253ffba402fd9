"""A trained model, loaded from its checkpoint alone: the one way every consumer reads a model.

Evaluation, prediction, export and serving all start here, so each sees the classes and the
Preprocessing the model was trained with, never values rebuilt from config keys or a DataModule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thaw.checkpoint import CheckpointError, read_checkpoint, run_record
from thaw.models.backbones import create_backbone
from thaw.models.classifier import Classifier
from thaw.preprocess import Preprocessing


@dataclass(frozen=True)
class TrainedModel:
    """The classifier in eval mode, on the CPU, with what it needs to be used."""

    model: Classifier
    preprocessing: Preprocessing
    classes: list[str]
    config: dict[str, Any]  # the composed config of the run that trained it
    path: Path


def load_trained(path: str | Path, channels_last: bool = False) -> TrainedModel:
    """Rebuild the classifier a thaw checkpoint describes and load its weights (read with
    `weights_only`: no code in the file runs). `channels_last` lays convolutions out in NHWC,
    which CUDA wants."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    record = run_record(checkpoint, path)
    if record.preprocessing is None:
        raise CheckpointError(
            f"{path} was written before thaw saved the preprocessing in checkpoints: train "
            "again to evaluate, predict or export it (it still serves as model.weights)"
        )
    preprocessing = Preprocessing.from_dict(record.preprocessing)
    model_cfg = record.config["model"]
    model = Classifier(
        create_backbone(
            model_cfg["name"],
            weights=None,
            family=model_cfg.get("family", "torchvision"),
            input_size=preprocessing.input_size,
            stem_stride=model_cfg.get("stem_stride"),
        ),
        record.classes,
        preprocessing,
        head_dropout=model_cfg["head_dropout"],
        label_smoothing=model_cfg["label_smoothing"],
        run_config=record.config,
        channels_last=channels_last,
    )
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"the weights in {path} do not fit the {model_cfg['name']} its config describes "
            f"({str(err).splitlines()[0]}): the file was changed after training; use the run's "
            "own checkpoint"
        ) from err
    model.eval()
    return TrainedModel(model, preprocessing, record.classes, record.config, path)
