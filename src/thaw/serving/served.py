"""Loading what a server answers with: its Predictor, and what /info says about the model.

A checkpoint is loaded with `load_trained`, an exported file through its own metadata: the same
Predictor and preprocessing as predict.py, so a served answer equals predict's. /info names the
model's files by basename and SHA-256 (never a path: it is open) and adds the run's test metrics
(its metrics.json), its rejection rule (None: the answers have no score and known) and, for an
exported file, the parity figures its export.json recorded.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from thaw import __version__
from thaw.checkpoint import file_identity, read_record, run_dir
from thaw.errors import UserError
from thaw.inference.predictor import Predictor, channels_last_on
from thaw.models import load_trained

METRICS = "metrics.json"
EXPORT_RECORD = "export.json"


def load_served(
    ckpt_paths: list[str], model_path: str | None, device: str, tta: str = "none"
) -> tuple[Predictor, dict[str, Any]]:
    """(the Predictor, the model's /info): from checkpoints (several: an ensemble) or from one
    exported ONNX file, never both."""
    if bool(ckpt_paths) == bool(model_path):
        raise UserError(
            "give either ckpt_path=<file.ckpt> or model_path=<model.onnx>, "
            f"not {'both' if ckpt_paths else 'neither'}"
        )
    if model_path:
        path = Path(model_path)
        predictor = Predictor.from_onnx(path, tta)
        export = read_record(path.parent / EXPORT_RECORD).get(path.name)
        name = (export or {}).get("model", "unknown")
        model = {"name": name, "format": "onnx", "files": [file_identity(path)]}
        metrics_dir = path.parent
    else:
        trained = [load_trained(p, channels_last=channels_last_on(device)) for p in ckpt_paths]
        predictor = Predictor.from_trained(trained, tta, device, ckpt_paths)
        name = "+".join(t.config["model"]["name"] for t in trained)
        files = [file_identity(p) for p in ckpt_paths]
        model = {"name": name, "format": "checkpoint", "files": files}
        export, metrics_dir = None, run_dir(Path(ckpt_paths[0]))
    preprocessing, rule = predictor.members[0].preprocessing, predictor.rejection
    metrics = read_record(metrics_dir / METRICS) if len(ckpt_paths) <= 1 else {}
    info = {
        "model": model,
        "classes": predictor.classes,
        "input_size": preprocessing.input_size,
        "preprocessing": preprocessing.to_dict(),
        "rejection": dataclasses.asdict(rule) if rule is not None else None,
        "device": str(predictor.device),
        "tta": tta,
        "thaw_version": __version__,
        "test_metrics": _scalar_test_metrics(metrics) or None,
        "export": _without_paths(export),
    }
    return predictor, info


def _scalar_test_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The run's headline test figures (not its per-class values or confusion matrix)."""
    return {k: v for k, v in metrics.items() if k.startswith("test/") and isinstance(v, float)}


def _without_paths(value: Any) -> Any:
    """`value` with every absolute path (export.json's `images_from`, say) cut to its basename:
    /info is open, and served metadata names files, not the server's directories."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value
