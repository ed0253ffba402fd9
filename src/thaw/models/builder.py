"""The one builder of the model module, from a model config: for training (weights loaded from
`model.weights`) and for loading a trained model (weights from its checkpoint).

Loading is the one way every consumer reads a model: evaluation, prediction, export and serving
all start at `load_trained`, so each sees the classes, Preprocessing and Postprocessing the model
was trained with, never values rebuilt from config keys or a DataModule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from thaw.checkpoint import MODEL_PREFIX, CheckpointError, read_checkpoint, run_record
from thaw.models.backbones import create_backbone
from thaw.models.network import ImageClassifier
from thaw.postprocess import Postprocessing
from thaw.preprocess import Preprocessing


def build_model(
    config: Mapping[str, Any],
    classes: Sequence[str],
    preprocessing: Preprocessing,
    postprocessing: Postprocessing,
    pretrained: bool = True,
    channels_last: bool = False,
) -> ImageClassifier:
    """The classifier the composed `config`'s model group describes, for `classes` at the
    preprocessing's input size: with `pretrained`, the backbone gets `model.weights` and the
    head is new; without, every weight is left to load (a trained model's checkpoint)."""
    model_cfg = config["model"]
    backbone = create_backbone(
        model_cfg["name"],
        model_cfg["weights"] if pretrained else None,
        model_cfg["family"],
        input_size=preprocessing.input_size,
        stem_stride=model_cfg["stem_stride"],
    )
    return ImageClassifier(
        backbone,
        classes,
        preprocessing,
        postprocessing,
        head_dropout=model_cfg["head_dropout"],
        config=dict(config),
        channels_last=channels_last,
    )


def load_trained(path: str | Path, channels_last: bool = False) -> ImageClassifier:
    """The classifier a thaw checkpoint describes, with its weights, in eval mode on the CPU
    (read with `weights_only`: no code in the file runs). `channels_last` lays convolutions out
    in NHWC, which CUDA wants."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    record = run_record(checkpoint, path)
    if record.preprocessing is None:
        raise CheckpointError(
            f"{path} was written before thaw saved the preprocessing in checkpoints: train "
            "again to evaluate, predict or export it (it still serves as model.weights)"
        )
    try:
        preprocessing = Preprocessing.from_dict(record.preprocessing)
        postprocessing = Postprocessing.from_dict(record.postprocessing)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path} holds a preprocessing or postprocessing record thaw cannot use ({err}): "
            "the file was changed after training; use the run's own checkpoint"
        ) from err
    model = build_model(
        record.config,
        record.classes,
        preprocessing,
        postprocessing,
        pretrained=False,
        channels_last=channels_last,
    )
    weights = {
        k[len(MODEL_PREFIX) :]: v
        for k, v in checkpoint.get("state_dict", {}).items()
        if k.startswith(MODEL_PREFIX)
    }
    try:
        model.load_state_dict(weights)
    except (TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"the weights in {path} do not fit the {record.config['model']['name']} its config "
            f"describes ({str(err).splitlines()[0]}): the file was changed after training; use "
            "the run's own checkpoint"
        ) from err
    return model.eval()
