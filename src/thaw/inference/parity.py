"""The parity gate: an exported model is kept only if it computes what its checkpoint computes,
measured on real images, so "the exported model gives different results" cannot ship."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from thaw.inference.export_formats import ExportError
from thaw.postprocess import Postprocessing

FP32_MAX_SOFTMAX_DIFF = 1e-4
FP32_MAX_SCORE_DIFF = 1e-4  # the rejection score's
INT8_MAX_ACCURACY_DROP = 0.01  # 1 point
# INT8 moves the features, so images near the rejection threshold change sides; past this share
# of the check images the export is kept with a warning (a few dozen check images decide it).
INT8_KNOWN_FLIPS_WARNING = 0.05
_BATCH = 64


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


def parity_figures(reference: nn.Module, exported: Any, images: CheckImages) -> dict[str, Any]:
    """Checkpoint and exported model side by side: the largest |softmax difference| over every
    image and class, the fraction of images whose top-1 class agrees, and both accuracies; for a
    model with a rejection rule also the largest |score difference| and the fraction of images
    known on one side only."""
    postprocessing = getattr(reference, "postprocessing", None)
    rule = postprocessing.rejection if postprocessing is not None else None
    with torch.inference_mode():
        expected, expected_score = _outputs(reference, images.reference, rule is not None)
        got, got_score = _outputs(exported, images.exported, rule is not None)
    if postprocessing is not None and postprocessing.multilabel:
        return _label_set_figures(postprocessing, expected, got.float(), images.labels)
    expected, got = expected.softmax(1), got.float().softmax(1)
    top1, top1_exported = expected.argmax(1), got.argmax(1)
    figures = {
        "images": len(images),
        "max_softmax_diff": float((expected - got).abs().max()),
        "top1_agreement": float((top1 == top1_exported).float().mean()),
        "accuracy_checkpoint": float((top1 == images.labels).float().mean()),
        "accuracy_exported": float((top1_exported == images.labels).float().mean()),
    }
    if rule is not None:
        flips = rule.known(expected_score) != rule.known(got_score.float())
        figures["max_score_diff"] = float((expected_score - got_score.float()).abs().max())
        figures["known_flips"] = float(flips.float().mean())
    return figures


def _label_set_figures(
    postprocessing: Postprocessing, expected: torch.Tensor, got: torch.Tensor, truth: torch.Tensor
) -> dict[str, Any]:
    """A multi-label model's side by side: the largest |sigmoid difference|, the fraction of
    images given the same label set, and each side's exact-match ratio against the truth."""
    expected, got = postprocessing.probabilities(expected), postprocessing.probabilities(got)
    sets, sets_exported = postprocessing.label_sets(expected), postprocessing.label_sets(got)
    truth = truth.bool()
    return {
        "images": len(truth),
        "max_sigmoid_diff": float((expected - got).abs().max()),
        "label_set_agreement": float((sets == sets_exported).all(1).float().mean()),
        "exact_match_checkpoint": float((sets == truth).all(1).float().mean()),
        "exact_match_exported": float((sets_exported == truth).all(1).float().mean()),
    }


def check_parity(
    reference: nn.Module, exported: Any, images: CheckImages, quantized: bool
) -> dict[str, Any]:
    """The figures, or a ParityError. fp32 must match within FP32_MAX_SOFTMAX_DIFF with the
    same top-1 (for label sets: the same set) on every image; INT8 approximates by design, so
    it may only lose accuracy (the exact-match ratio) up to INT8_MAX_ACCURACY_DROP."""
    if len(images) == 0:
        raise ExportError("the parity gate got no images to check the exported model on")
    figures = parity_figures(reference, exported, images)
    if "label_set_agreement" in figures:
        _check_label_sets(figures, quantized)
        return figures
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
    elif figures.get("max_score_diff", 0.0) > FP32_MAX_SCORE_DIFF:
        raise ParityError(
            f"the exported model's rejection score differs from its checkpoint's by up to "
            f"{figures['max_score_diff']:.3g} on {n} check images (at most "
            f"{FP32_MAX_SCORE_DIFF:g} allowed), so it was not written. The exporter changed "
            "what the model computes: report it with the checkpoint, or try another format"
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


def _check_label_sets(figures: dict[str, Any], quantized: bool) -> None:
    n = figures["images"]
    agree = round(figures["label_set_agreement"] * n)
    drop = figures["exact_match_checkpoint"] - figures["exact_match_exported"]
    if quantized and drop > INT8_MAX_ACCURACY_DROP + 1e-9:
        raise ParityError(
            f"the INT8 model's exact-match ratio on {n} check images is "
            f"{figures['exact_match_exported']:.4f} against the checkpoint's "
            f"{figures['exact_match_checkpoint']:.4f}, a drop of {100 * drop:.2f} points (at "
            f"most {100 * INT8_MAX_ACCURACY_DROP:g} allowed), so it was not written. Calibrate "
            "on more images (calibration_images=) or export fp32 (format=onnx)"
        )
    if not quantized and (figures["max_sigmoid_diff"] > FP32_MAX_SOFTMAX_DIFF or agree != n):
        raise ParityError(
            f"the exported model disagrees with its checkpoint on {n} check images: max "
            f"|sigmoid difference| {figures['max_sigmoid_diff']:.3g} (at most "
            f"{FP32_MAX_SOFTMAX_DIFF:g} allowed) and the label sets agree on {agree}/{n} (all "
            "required), so it was not written. The exporter changed what the model computes: "
            "report it with the checkpoint, or try another format"
        )


def _outputs(model: Any, images: torch.Tensor, scored: bool) -> tuple[torch.Tensor, Any]:
    """Logits, and with `scored` the rejection scores (else None), batch by batch."""
    if not scored:
        return torch.cat([model(batch) for batch in images.split(_BATCH)]), None
    logits, scores = zip(*(model.scored(batch) for batch in images.split(_BATCH)), strict=True)
    return torch.cat(logits), torch.cat(scores)


def rule_warning(figures: dict[str, Any]) -> str | None:
    """The warning for an INT8 model whose rejection rule decides too many check images
    otherwise than its checkpoint's (see INT8_KNOWN_FLIPS_WARNING), None where it does not."""
    flips = figures.get("known_flips", 0.0)
    if flips <= INT8_KNOWN_FLIPS_WARNING:
        return None
    return (
        f"the INT8 model's rejection rule decides {100 * flips:.1f}% of {figures['images']} "
        f"check images otherwise than the checkpoint's (more than "
        f"{100 * INT8_KNOWN_FLIPS_WARNING:g}%): its known column will differ near the "
        "threshold. Export fp32 (format=onnx) where that matters"
    )
