"""An exported ONNX classifier run with ONNX Runtime, with the metadata it carries."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from thaw.errors import UserError
from thaw.inference.metadata import UINT8_INPUT, ExportMetadata

EXTRA = "export"  # pip install "thaw-vision[export]" brings onnx, onnxruntime and onnxscript


def import_onnxruntime() -> ModuleType:
    """onnxruntime, or an error naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise UserError(
            f"this needs onnxruntime, which is not installed: pip install 'thaw-vision[{EXTRA}]'"
        ) from err
    return onnxruntime


def _unreadable(ort: ModuleType) -> tuple[type[BaseException], ...]:
    """What ONNX Runtime raises for a file it cannot load as a model (not parseable, no graph, a
    graph or operator it refuses), as against a failure of the runtime itself."""
    state = ort.capi.onnxruntime_pybind11_state
    return (
        state.InvalidProtobuf,
        state.InvalidArgument,
        state.InvalidGraph,
        state.NoModel,
        state.Fail,
        state.NotImplemented,
    )


class OnnxModel:
    """`model(batch)` -> logits (N, classes) as a float32 torch tensor, for a batch laid out as
    `metadata.input_layout` says (a torch tensor or numpy array); `model.scored(batch)` adds the
    rejection score where the graph has one.

    `threads` defaults to every core this process may use: ONNX Runtime's own default counts
    physical cores, which is slower on a machine with hyper-threads (README, Inference speed).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"model_path={self.path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except _unreadable(ort) as err:
            reason = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
            raise UserError(
                f"model_path={self.path} is not an ONNX model ONNX Runtime can load: it is "
                f"truncated, corrupt or another kind of file ({reason}). Export it again: "
                "python export.py ckpt_path=<its checkpoint> format=onnx"
            ) from None
        pairs = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ExportMetadata.from_strings(pairs, str(self.path))
        self.input_name = self.session.get_inputs()[0].name
        self.dtype = np.uint8 if self.metadata.input_layout == UINT8_INPUT else np.float32

    def __call__(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self._run(batch)[0]

    def scored(self, batch: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the rejection rule's score (N,), where the graph computes one (a model
        exported with a rule: `metadata.postprocessing.rejection`)."""
        logits, score = self._run(batch)
        return logits, score

    def _run(self, batch: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        array = batch.numpy() if isinstance(batch, torch.Tensor) else batch
        outputs = self.session.run(None, {self.input_name: array.astype(self.dtype, copy=False)})
        return [torch.from_numpy(output) for output in outputs]
