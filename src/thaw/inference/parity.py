"""The parity gate: an exported model is kept only if it computes what its checkpoint computes,
measured on real images, so "the exported model gives different results" cannot ship."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from thaw.inference.export_formats import ExportError

FP32_MAX_SOFTMAX_DIFF = 1e-4
INT8_MAX_ACCURACY_DROP = 0.01  # 1 point
_BATCH = 64

Model = Callable[[torch.Tensor], torch.Tensor]


class ParityError(ExportError):
    """The exported model disagrees with its checkpoint; the message gives the figures."""


@dataclass(frozen=True)
class CheckImages:
    """The same images twice: as the checkpoint takes them (`Preprocessing.transform()`) and as
    the exported graph takes them (its input layout; the same tensor for float input)."""

    reference: torch.Tensor
    exported: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def parity_figures(reference: nn.Module, exported: Model, images: CheckImages) -> dict[str, Any]:
    """Checkpoint and exported model side by side: the largest |softmax difference| over every
    image and class, the fraction of images whose top-1 class agrees, and both accuracies."""
    with torch.inference_mode():
        expected = _logits(reference, images.reference).softmax(1)
        got = _logits(exported, images.exported).float().softmax(1)
    top1, top1_exported = expected.argmax(1), got.argmax(1)
    return {
        "images": len(images),
        "max_softmax_diff": float((expected - got).abs().max()),
        "top1_agreement": float((top1 == top1_exported).float().mean()),
        "accuracy_checkpoint": float((top1 == images.labels).float().mean()),
        "accuracy_exported": float((top1_exported == images.labels).float().mean()),
    }


def check_parity(
    reference: nn.Module, exported: Model, images: CheckImages, quantized: bool
) -> dict[str, Any]:
    """The figures, or a ParityError. fp32 must match within FP32_MAX_SOFTMAX_DIFF with the
    same top-1 on every image; INT8 approximates by design, so it may only lose accuracy up to
    INT8_MAX_ACCURACY_DROP."""
    if len(images) == 0:
        raise ExportError("the parity gate got no images to check the exported model on")
    figures = parity_figures(reference, exported, images)
    n = figures["images"]
    agree = round(figures["top1_agreement"] * n)
    if quantized:
        drop = figures["accuracy_checkpoint"] - figures["accuracy_exported"]
        if drop > INT8_MAX_ACCURACY_DROP + 1e-9:
            raise ParityError(
                f"the INT8 model's accuracy on {n} check images is "
                f"{figures['accuracy_exported']:.4f} against the checkpoint's "
                f"{figures['accuracy_checkpoint']:.4f}, a drop of {100 * drop:.2f} points (at "
                f"most {100 * INT8_MAX_ACCURACY_DROP:g} allowed; top-1 agrees on {agree}/{n}), so "
                "it was not written. Calibrate on more images (calibration_images=) or export "
                "fp32 (format=onnx)"
            )
    elif figures["max_softmax_diff"] > FP32_MAX_SOFTMAX_DIFF or agree != n:
        raise ParityError(
            f"the exported model disagrees with its checkpoint on {n} check images: max "
            f"|softmax difference| {figures['max_softmax_diff']:.3g} (at most "
            f"{FP32_MAX_SOFTMAX_DIFF:g} allowed) and top-1 agrees on {agree}/{n} (all required), "
            "so it was not written. The exporter changed what the model computes: report it "
            "with the checkpoint, or try another format"
        )
    return figures


def _logits(model: Model, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(batch) for batch in images.split(_BATCH)])
