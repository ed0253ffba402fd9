"""The Predictor: images in, class probabilities out, for one model or an averaged ensemble.

Every model brings its own Preprocessing and Postprocessing (from its checkpoint or its exported
file), so the members of an ensemble may have been trained at different sizes or statistics;
test-time augmentation works on the preprocessed batch, where a flip and a shift are cheap.
predict.py, eval.py and the server all use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from thaw.data.images import load_image, map_files
from thaw.data.sources.csv import LABEL_SEPARATOR  # predictions.csv's labels, as data=csv's
from thaw.errors import UserError
from thaw.inference.metadata import UINT8_INPUT
from thaw.inference.onnx_model import OnnxModel
from thaw.models import ImageClassifier, load_trained
from thaw.postprocess import Postprocessing, Rejection
from thaw.preprocess import Preprocessing

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip", "flip_crop")
# The shift of flip_crop's corner crops, as a fraction of the side: augment=basic's crop_padding.
CROP_SHIFT = 0.125


@dataclass(frozen=True)
class Member:
    """One model: `model(batch)` -> logits (N, classes), for batches made by `transform`
    (normalised float, or with `normalize=False` the uint8 RGB crop an exported graph takes),
    turned into probabilities by its `postprocessing`."""

    model: Callable[[torch.Tensor], torch.Tensor]
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    normalize: bool = True

    @cached_property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """A decoded image -> this model's input."""
        return self.preprocessing.transform(normalize=self.normalize)

    @cached_property
    def black(self) -> torch.Tensor:
        """Black as this model's input encodes it, per channel: what flip_crop pads with, as
        training's shift augmentation does."""
        if not self.normalize:
            return torch.zeros(3)
        mean, std = torch.tensor(self.preprocessing.mean), torch.tensor(self.preprocessing.std)
        return -mean / std


class Predictor:
    """The softmax of each member, averaged over its test-time views, then over the members.
    Each member's logits go through its Postprocessing (the temperature fitted after training;
    1.0 for a model that has none), so its probabilities are the calibrated ones.

    `tta`: "none"; "flip" adds the horizontal flip; "flip_crop" adds the flip and 4 views
    shifted by 1/8 of the side towards each corner (the 4 corner crops of the batch padded with
    black by 1/8 of each side), 6 views in all. Batches run on `device`.
    """

    def __init__(
        self,
        members: Sequence[Member],
        classes: Sequence[str],
        tta: str = "none",
        device: torch.device | str = "cpu",
    ) -> None:
        if tta not in TTA_MODES:
            raise UserError(f"tta must be one of {list(TTA_MODES)}, got {tta!r}")
        if not members:
            raise ValueError("a Predictor needs at least one model")
        self.members = list(members)
        self.classes = list(classes)
        self.tta = tta
        self.device = torch.device(device)
        # JPEGs decode at a reduced scale that still covers every member's resize.
        self.decode_size = max(m.preprocessing.resize_size for m in self.members)

    @classmethod
    def from_trained(
        cls,
        models: Sequence[ImageClassifier],
        tta: str = "none",
        device: torch.device | str = "cpu",
        paths: Sequence[str | Path] = (),
    ) -> Predictor:
        """An ensemble (or a single model) of loaded checkpoints, which must share their classes;
        `paths`, the checkpoints' files, name them in that error."""
        names = [str(p) for p in paths] or [f"checkpoint {i}" for i in range(1, len(models) + 1)]
        first = models[0]
        for name, other in zip(names[1:], models[1:], strict=True):
            if other.postprocessing.multilabel != first.postprocessing.multilabel:
                raise UserError(
                    f"an ensemble needs checkpoints of one kind: {names[0]} and {name} are one "
                    "multi-label and one single-label model"
                )
            if other.classes != first.classes:
                raise UserError(
                    f"an ensemble needs checkpoints with the same classes in the same order: "
                    f"{names[0]} has {first.classes}, {name} has {other.classes}"
                )
        members = [Member(m.to(device), m.preprocessing, m.postprocessing) for m in models]
        return cls(members, first.classes, tta, device)

    @classmethod
    def from_checkpoints(
        cls, paths: Sequence[str | Path], tta: str = "none", device: torch.device | str = "cpu"
    ) -> Predictor:
        nhwc = channels_last_on(device)
        models = [load_trained(p, channels_last=nhwc) for p in paths]
        return cls.from_trained(models, tta, device, paths)

    @classmethod
    def from_onnx(cls, path: str | Path, tta: str = "none") -> Predictor:
        """An exported ONNX model, run by ONNX Runtime on the CPU."""
        model = OnnxModel(path)
        meta = model.metadata
        member = Member(
            model,
            meta.preprocessing,
            meta.postprocessing,
            normalize=meta.input_layout != UINT8_INPUT,
        )
        return cls([member], meta.classes, tta)

    def prepare(self, image: Image.Image | Path) -> list[torch.Tensor]:
        """Each member's input for one image (a path is decoded as training decodes it)."""
        if not isinstance(image, Image.Image):
            image = load_image(Path(image), self.decode_size)
        return [member.transform(image) for member in self.members]

    @property
    def rejection(self) -> Rejection | None:
        """The rule that says "none of these": a single model's, where it has one (an
        ensemble's members each have their own score scale, so an ensemble has none)."""
        return self.members[0].postprocessing.rejection if len(self.members) == 1 else None

    @cached_property
    def thresholds(self) -> torch.Tensor | None:
        """A multi-label model's per-label thresholds (an ensemble's: the mean of its members',
        as its probabilities are their mean), None for a single-label one."""
        found = [m.postprocessing.thresholds for m in self.members]
        if found[0] is None:
            return None
        return torch.tensor(found).mean(dim=0)

    def label_sets(self, probabilities: torch.Tensor) -> list[list[tuple[str, float]]]:
        """A multi-label model's answer for each row of `probabilities` (N, classes): the
        (label, probability) pairs at or above their thresholds, most likely first."""
        thresholds = self.thresholds
        if thresholds is None:
            raise ValueError("a single-label model has no label sets")
        answers = []
        for row in probabilities:
            kept = torch.nonzero(row >= thresholds.to(row.dtype)).flatten().tolist()
            pairs = [(self.classes[i], float(row[i])) for i in kept]
            answers.append(sorted(pairs, key=lambda pair: -pair[1]))
        return answers

    def probabilities(self, images: Sequence[Image.Image | Path]) -> torch.Tensor:
        """Class probabilities (N, classes) of decoded images or image files."""
        return self.batch_probabilities(stack_inputs([self.prepare(image) for image in images]))

    def batch_probabilities(self, batches: Sequence[torch.Tensor]) -> torch.Tensor:
        """Class probabilities (N, classes) on the CPU from one preprocessed batch per member."""
        return self._run(batches, scored=False)[0]

    def batch_answers(
        self, batches: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class probabilities (N, classes) and the rejection rule's scores (N,) on the CPU,
        averaged over the test-time views (None without a rule: see `rejection`)."""
        return self._run(batches, scored=self.rejection is not None)

    @torch.inference_mode()
    def _run(
        self, batches: Sequence[torch.Tensor], scored: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        softmaxes, scores = [], None
        for member, batch in zip(self.members, batches, strict=True):
            views = torch.cat(
                tta_views(batch.to(self.device), self.tta, member.black.to(self.device))
            )
            if scored:
                logits, score = member.model.scored(views)  # type: ignore[attr-defined]
                scores = score.float().view(-1, len(batch)).mean(dim=0).cpu()
            else:
                logits = member.model(views)
            softmax = member.postprocessing.probabilities(logits.float())
            softmaxes.append(softmax.view(-1, len(batch), softmax.shape[-1]).mean(dim=0))
        return torch.stack(softmaxes).mean(dim=0).cpu(), scores

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """The `k` most likely (class, probability) pairs of each row, most likely first (k is
        capped at the number of classes)."""
        values, indices = probabilities.topk(min(k, len(self.classes)), dim=-1)
        return [
            [(self.classes[i], p) for i, p in zip(row_i, row_p, strict=True)]
            for row_i, row_p in zip(indices.tolist(), values.tolist(), strict=True)
        ]


def stack_inputs(prepared: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-image inputs (one per member, from `prepare`) -> one batch per member, the input of
    `batch_probabilities`."""
    return [torch.stack(inputs) for inputs in zip(*prepared, strict=True)]


def tta_views(batch: torch.Tensor, tta: str, black: torch.Tensor) -> list[torch.Tensor]:
    """The views of a batch (N, C, H, W) that `tta` averages over (see Predictor); `black` is
    the per-channel value of the padding."""
    views = [batch]
    if tta in ("flip", "flip_crop"):
        views.append(batch.flip(-1))
    if tta == "flip_crop":
        n, c, h, w = batch.shape
        pad_h, pad_w = max(1, round(CROP_SHIFT * h)), max(1, round(CROP_SHIFT * w))
        padded = black.to(batch.dtype).view(1, c, 1, 1).repeat(n, 1, h + 2 * pad_h, w + 2 * pad_w)
        padded[..., pad_h : pad_h + h, pad_w : pad_w + w] = batch
        views += [
            padded[..., top : top + h, left : left + w]
            for top in (0, 2 * pad_h)
            for left in (0, 2 * pad_w)
        ]
    return views


@dataclass(frozen=True)
class FileResult:
    """One file's probabilities (classes,) and rejection score (None without a rule), or the
    error that kept it from being read."""

    path: Path
    probabilities: torch.Tensor | None
    error: str | None = None
    score: float | None = None


def predict_files(
    predictor: Predictor, paths: Sequence[Path], batch_size: int
) -> Iterator[FileResult]:
    """Every file's result, in order, decoding on a thread pool and predicting `batch_size` files
    at a time; a file that cannot be decoded gets its error and the others go on."""

    def prepare(path: Path) -> list[torch.Tensor] | str:
        try:
            return predictor.prepare(path)
        except OSError as err:
            return str(err)

    prepared = map_files(prepare, paths)
    for start in range(0, len(paths), batch_size):
        chunk = [(path, next(prepared)) for path in paths[start : start + batch_size]]
        good = [inputs for _, inputs in chunk if not isinstance(inputs, str)]
        probabilities, scores = predictor.batch_answers(stack_inputs(good)) if good else ([], None)
        row_scores = scores.tolist() if scores is not None else [None] * len(good)
        answers = iter(zip(probabilities, row_scores, strict=True))
        for path, inputs in chunk:
            if isinstance(inputs, str):
                yield FileResult(path, None, inputs)
            else:
                row_probabilities, score = next(answers)
                yield FileResult(path, row_probabilities, score=score)


def prediction_row(
    result: FileResult, predictor: Predictor, top_k: int, reject: bool = False
) -> dict[str, Any]:
    """path, label, prob, [score, known,] top1_label, top1_prob, ..., error: None where there is
    no value. `score` and `known` come with a rejection rule; with `reject`, a row that is not
    known is labelled as the rule says (its top-k keep the classes). A multi-label model's row
    is path, labels (the set, `|`-separated), prob_<class> for every class, error."""
    if predictor.thresholds is not None:
        return label_set_row(result, predictor)
    k = min(top_k, len(predictor.classes))
    probabilities = result.probabilities
    ranked: list[tuple[Any, Any]] = [(None, None)] * k  # an error row: empty cells
    if probabilities is not None:
        ranked = predictor.top_k(probabilities[None], k)[0]
    row = {"path": str(result.path), "label": ranked[0][0], "prob": ranked[0][1]}
    row.update(judged(predictor.rejection, row["label"], result.score, reject))
    for i, (label, prob) in enumerate(ranked, start=1):
        row[f"top{i}_label"], row[f"top{i}_prob"] = label, prob
    row["error"] = result.error
    return row


def label_set_row(result: FileResult, predictor: Predictor) -> dict[str, Any]:
    """A multi-label model's row of predictions.csv (see prediction_row)."""
    probabilities = result.probabilities
    row: dict[str, Any] = {"path": str(result.path), "labels": None}
    if probabilities is not None:
        labels = predictor.label_sets(probabilities[None])[0]
        row["labels"] = LABEL_SEPARATOR.join(label for label, _ in labels)
    for i, name in enumerate(predictor.classes):
        row[f"prob_{name}"] = None if probabilities is None else float(probabilities[i])
    row["error"] = result.error
    return row


def judged(
    rule: Rejection | None, label: str | None, score: float | None, reject: bool
) -> dict[str, Any]:
    """The answer's `label` and, with a rule, its `score` and `known` (None where there is no
    score: a file not read); with `reject`, an image that is not known gets the rule's label.
    predict's rows and the served answers both come from here, so their `known` agree."""
    if rule is None:
        return {"label": label}
    known = None if score is None else score >= rule.threshold
    rejected = reject and known is False
    return {"label": rule.label if rejected else label, "score": score, "known": known}


def check_rejection(predictor: Predictor, reject: bool, model: str) -> None:
    """Say where there is no rejection rule (no score and known in the answers), and refuse
    reject=true then, naming how to get one: predict and serve give the same advice."""
    if predictor.rejection is not None:
        return
    if predictor.thresholds is not None:
        if reject:
            raise UserError(
                f"reject=true: {model} is multi-label, and has no rejection rule: an image of "
                "none of its labels gets an empty label set. Leave reject=false"
            )
        return
    if len(predictor.members) > 1:
        why = "an ensemble has no rejection rule (each member's score has its own scale)"
        fix = "give one checkpoint"
    else:
        why = f"{model} has no rejection rule (it was trained before thaw fitted one)"
        fix = (
            "fit one without training: python fit_reject.py ckpt_path=<its checkpoint>, then "
            "export it again where it is an exported file"
        )
    if reject:
        raise UserError(f"reject=true: {why}. To reject, {fix}")
    log.info("%s: no score and known in the answers. To add them, %s", why.capitalize(), fix)


def channels_last_on(device: torch.device | str) -> bool:
    """Whether a model served on `device` lays its convolutions out in NHWC: on any CUDA device
    (`cuda`, `cuda:1`), whose kernels want it, as training's `trainer.channels_last=auto`."""
    return torch.device(device).type == "cuda"


def best_device(name: str) -> str:
    """`device`, with auto the CUDA GPU where there is one, else the CPU."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def checkpoint_paths(value: Any) -> list[str]:
    """`ckpt_path` as a list: one path, or several for an ensemble."""
    if value is None or isinstance(value, (str, Path)):
        return [] if value is None else [str(value)]
    return [str(v) for v in value]
