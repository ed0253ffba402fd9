"""The exported files: a classifier written as ONNX (fp32 or static INT8) or as a torch.export
program, each carrying its ExportMetadata, and read back the way a user would run it.

Only torch, ONNX and ONNX Runtime are used here, so that reading an exported file never needs the
training code.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms.v2 import functional as F

from thaw.errors import UserError
from thaw.inference.metadata import UINT8_INPUT, ExportMetadata
from thaw.inference.onnx_model import EXTRA, OnnxModel, import_onnxruntime

FILE_NAMES = {"onnx": "model.onnx", "onnx_int8": "model_int8.onnx", "torch_export": "model.pt2"}
FORMATS = tuple(FILE_NAMES)
INT8 = "onnx_int8"
# The ONNX opset written unless export.yaml's `opset` says otherwise (it holds the same value).
OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
SCORE_NAME = "score"  # the rejection rule's score, an output where the model has a rule
_CALIBRATION_BATCH = 32


class ExportError(UserError):
    """An export that cannot go ahead as asked: the message says what and how to fix it."""


def check_format(format: str) -> None:
    """Fail before any work for a format that does not exist or whose tools are missing."""
    if format not in FORMATS:
        raise ExportError(
            f"format={format!r} is not an export format; choose one of {', '.join(FORMATS)}"
        )
    if format.startswith("onnx"):
        import_onnxruntime()
        for module in ("onnx", "onnxscript"):  # the writer's tools, from the same extra
            if importlib.util.find_spec(module) is None:
                raise UserError(
                    f"this needs {module}, which is not installed: "
                    f"pip install 'thaw-vision[{EXTRA}]'"
                )


class GraphModel(nn.Module):
    """What goes into the exported graph: the classifier, behind the Preprocessing's scaling and
    normalisation when the graph takes uint8 RGB (`metadata.input_layout`). Both steps are
    torchvision's own kernels, the ones `Preprocessing.transform()` runs, so the graph computes
    exactly what the checkpoint was given."""

    def __init__(self, classifier: nn.Module, metadata: ExportMetadata) -> None:
        super().__init__()
        self.classifier = classifier
        self.normalize = metadata.input_layout == UINT8_INPUT
        self.mean = list(metadata.preprocessing.mean)
        self.std = list(metadata.preprocessing.std)

    @property
    def output_names(self) -> list[str]:
        """The logits, and the rejection score where the classifier has a rule."""
        scored = getattr(self.classifier, "rejection", None) is not None
        return [OUTPUT_NAME, SCORE_NAME] if scored else [OUTPUT_NAME]

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.normalize:
            images = F.to_dtype(images, torch.float32, scale=True)
            images = F.normalize(images, self.mean, self.std)
        if len(self.output_names) == 2:
            return self.classifier.scored(images)
        return self.classifier(images)


def write_exported(
    format: str,
    classifier: nn.Module,
    metadata: ExportMetadata,
    path: Path,
    calibration: torch.Tensor | None = None,
    opset: int = OPSET,
) -> None:
    """Write `classifier` (eval mode, CPU) as `format` to `path`. INT8 needs `calibration`:
    images laid out as the graph takes them (the caller has run `check_format`)."""
    module = GraphModel(classifier, metadata).eval()
    preprocessing = metadata.preprocessing
    dtype = torch.uint8 if module.normalize else torch.float32
    example = torch.zeros(2, 3, preprocessing.input_size, preprocessing.input_size, dtype=dtype)
    batch = {INPUT_NAME: {0: torch.export.Dim("batch")}}
    if format == "torch_export":
        program = torch.export.export(module, (example,), dynamic_shapes=batch)
        torch.export.save(program, path, extra_files=metadata.to_strings())
        return
    if format == INT8:
        if calibration is None or len(calibration) == 0:
            raise ExportError("format=onnx_int8 needs calibration images; none were given")
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            _write_onnx(module, example, batch, fp32, opset)
            _quantize(fp32, path, calibration)
    else:
        _write_onnx(module, example, batch, path, opset)
    _set_onnx_metadata(path, metadata)


def _write_onnx(
    module: GraphModel, example: torch.Tensor, batch: dict, path: Path, opset: int
) -> None:
    """fp32 ONNX with a dynamic batch axis, one self-contained file.

    dynamo=True, the torch.export-based exporter, over the legacy TorchScript-based one (which
    torch deprecates): both give the same numbers and ONNX Runtime latency (README, Export),
    but this one writes a clean graph (no Identity nodes over initializers), traces the way the
    .pt2 format does, and is where torch's ONNX support is going; it only exports slower.
    `external_data=False` keeps the weights inside the file (fine below ONNX's 2 GB protobuf
    limit)."""
    for name in ("onnx_ir", "onnxscript"):  # its optimiser logs every pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=True,
        external_data=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=module.output_names,
        dynamic_shapes=batch,
        verbose=False,
    )


def _quantize(fp32: Path, path: Path, calibration: torch.Tensor) -> None:
    """Static INT8 (QDQ, per-channel weights), calibrated with min/max on `calibration`.

    ONNX Runtime's pre-processing (ONNX shape inference, graph optimisation) runs first, as its
    documentation asks; its symbolic shape inference, which is for transformer graphs, is left
    out: it fails on the rejection score's broadcast against the class means. Activations are
    uint8, weights int8 (U8S8): int8 activations (S8S8) are slow on a CPU without VNNI (README,
    Export). U8S8 can saturate there; the parity gate would catch the loss. The rejection
    score's nodes stay float32: a threshold on distances is finer than INT8's steps."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[torch.Tensor] = iter(calibration.split(_CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch.numpy()}

    prepared = fp32.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(path),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=_score_nodes(fp32),
    )


def _score_nodes(path: Path) -> list[str]:
    """The names of the graph's nodes that compute the rejection score (the exporter records
    each node's module path in its `name_scopes`)."""
    import onnx

    return [
        node.name
        for node in onnx.load(str(path)).graph.node
        for prop in node.metadata_props
        if prop.key == "pkg.torch.onnx.name_scopes" and "classifier.rejection" in prop.value
    ]


def _set_onnx_metadata(path: Path, metadata: ExportMetadata) -> None:
    """Replace the file's metadata_props with thaw's (the exporter's own are internal names)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata.to_strings())
    onnx.save(model, str(path))


def load_pt2(path: str | Path) -> tuple[nn.Module, ExportMetadata]:
    """A .pt2 program as a callable module, with the metadata in its extra_files."""
    # torch.export.load fills in only the extra_files it is asked for, by name.
    extra = dict.fromkeys(ExportMetadata.keys(), "")
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), ExportMetadata.from_strings(extra, str(path))


class Pt2Model:
    """A loaded .pt2 program with OnnxModel's interface: `model(batch)` -> logits, and
    `model.scored(batch)` -> (logits, score) where it has a rejection score."""

    def __init__(self, path: str | Path) -> None:
        self.module, self.metadata = load_pt2(path)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        outputs = self.module(batch)
        return outputs[0] if isinstance(outputs, tuple) else outputs

    def scored(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, score = self.module(batch)
        return logits, score


def load_exported(path: Path) -> OnnxModel | Pt2Model:
    """The exported file as its users run it: ONNX through ONNX Runtime, a .pt2 as the loaded
    ExportedProgram; `model(batch)` -> logits, `model.scored(batch)` adds the score."""
    if path.suffix == ".onnx":
        return OnnxModel(path)
    return Pt2Model(path)
