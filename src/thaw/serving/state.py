"""What one app serves with: its settings and the Predictor behind its batcher, on `app.state`.

The routes are module-level (routes.py), so each app keeps its own model, queue and counters
here rather than in a closure; several apps in one process (the tests) stay apart.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, nullcontext
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import torch
from fastapi import HTTPException
from PIL import Image
from starlette.concurrency import run_in_threadpool

from thaw.analysis import gradcam
from thaw.analysis.html import data_uri, png_bytes
from thaw.inference.predictor import Member, Predictor, judged, stack_inputs
from thaw.serving.batcher import DynamicBatcher, Overloaded
from thaw.serving.budget import BudgetExhausted, PixelBudget
from thaw.serving.metrics import RequestMetrics
from thaw.serving.uploads import decode_upload, decoded_pixels

MB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """What bounds the server: batching, upload size, decoded pixels, queue length; and what
    an answer holds: its top-k, and with `reject` the rule's label for an image not known."""

    max_batch_size: int = 32
    batch_timeout_ms: float = 5.0
    max_upload_mb: float = 10.0
    max_image_pixels: int = 40_000_000
    max_pixels_in_flight: int = 50_000_000
    decode_wait_s: float = 10.0
    body_timeout_s: float = 30.0
    max_pending: int = 256
    top_k: int = 5
    reject: bool = False
    api_key: str | None = None
    model_name: str | None = None  # on the Open Inference Protocol's routes; None: the model's


@dataclass
class ServeState:
    """One app's model, settings, batcher and counters; `info` is what /info says of the model."""

    predictor: Predictor
    info: dict[str, Any]
    settings: ServeSettings
    batcher: DynamicBatcher
    budget: PixelBudget
    metrics: RequestMetrics
    explainer: Member | None
    page: str

    @classmethod
    def build(
        cls, predictor: Predictor, info: dict[str, Any], settings: ServeSettings
    ) -> ServeState:
        batcher = DynamicBatcher(
            lambda inputs: _answers(predictor, inputs),
            settings.max_batch_size,
            settings.batch_timeout_ms / 1000,
            settings.max_pending,
        )
        budget = PixelBudget(settings.max_pixels_in_flight, settings.decode_wait_s)
        page = files("thaw.serving").joinpath("page.html").read_text()
        return cls(
            predictor,
            info,
            settings,
            batcher,
            budget,
            RequestMetrics(),
            _explainer(predictor),
            page,
        )

    @property
    def upload_limit(self) -> int:
        return int(self.settings.max_upload_mb * MB)

    async def classify(
        self, data: bytes, explain: bool = False, turn: asyncio.Lock | None = None
    ) -> dict[str, Any]:
        """One upload's answer (with its Grad-CAM overlay where `explain`), or the UploadError
        that says what is wrong with it. Its decoded pixels are held in the budget for as long
        as the decoded image lives: until it is preprocessed, or drawn on with `explain`.

        The files of one batch share a `turn`: one at a time waits for the budget, so each
        file's wait starts when the one before it got its pixels, and a batch larger than the
        budget is decoded in order rather than timing out together."""
        if not explain:
            return self._answer(*await self.infer(data, turn))
        try:
            async with self.budget.hold(await self._pixels(data)):
                with self.batcher.coming():
                    image, inputs = await run_in_threadpool(self._prepare, data, True)
                answer = self._answer(*await self.infer_prepared(inputs))
                if "labels" in answer:  # label sets: each predicted label's own overlay
                    for item in answer["labels"]:
                        item["explanation"] = await self._explanation(image, item["label"])
                    return answer
                top = answer["top_k"][0]["label"]  # the label may be the rule's
                answer["explanation"] = await self._explanation(image, top)
                return answer
        except BudgetExhausted as err:
            raise _busy(err) from None

    async def infer(
        self, data: bytes, turn: asyncio.Lock | None = None
    ) -> tuple[torch.Tensor, float | None]:
        """One upload's probabilities and rejection score (None without a rule), its decoded
        pixels held in the budget until it is preprocessed: what every route's answer is made
        of (thaw's and the Open Inference Protocol's)."""
        pixels = await self._pixels(data)
        try:
            async with AsyncExitStack() as held:
                async with turn or nullcontext():  # the budget is waited for in turn
                    await held.enter_async_context(self.budget.hold(pixels))
                with self.batcher.coming():
                    _, inputs = await run_in_threadpool(self._prepare, data, False)
        except BudgetExhausted as err:
            raise _busy(err) from None
        return await self.infer_prepared(inputs)

    async def infer_prepared(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, float | None]:
        """The answer to one image's model inputs (one per member), through the batcher."""
        try:
            return await self.batcher.submit(inputs)
        except Overloaded as err:
            raise _busy(err) from None

    async def _pixels(self, data: bytes) -> int:
        """The pixels `data` decodes to, read from its header (an UploadError if too many)."""
        size, limit = self.predictor.decode_size, self.settings.max_image_pixels
        return await run_in_threadpool(decoded_pixels, data, size, limit)

    async def _explanation(self, image: Image.Image, label: str) -> str:
        """The Grad-CAM overlay of `label` on the model's view of `image`, as a PNG data URI."""
        assert self.explainer is not None
        target = self.predictor.classes.index(label)
        model, preprocessing = self.explainer.model, self.explainer.preprocessing
        ((_, picture),) = await self.batcher.run_alone(
            lambda: gradcam.explain(model, preprocessing, [image], [target])
        )
        return data_uri(png_bytes(picture))

    def _prepare(
        self, data: bytes, keep_image: bool
    ) -> tuple[Image.Image | None, list[torch.Tensor]]:
        """The model's inputs, and the decoded image only where it is still needed."""
        image = decode_upload(data, self.predictor.decode_size)
        return (image if keep_image else None), self.predictor.prepare(image)

    def _answer(self, probabilities: torch.Tensor, score: float | None) -> dict[str, Any]:
        """label, prob, [score, known,] top_k: as predict's row for the same image. A
        multi-label model answers labels (those at or above their thresholds, each with its
        probability, most likely first) and every class's probability."""
        if self.predictor.thresholds is not None:
            labels = self.predictor.label_sets(probabilities[None])[0]
            return {
                "labels": [{"label": label, "prob": prob} for label, prob in labels],
                "probabilities": dict(
                    zip(self.predictor.classes, probabilities.tolist(), strict=True)
                ),
            }
        ranked = self.predictor.top_k(probabilities[None], self.settings.top_k)[0]
        answer = {"label": ranked[0][0], "prob": ranked[0][1]}
        answer.update(judged(self.predictor.rejection, ranked[0][0], score, self.settings.reject))
        answer["top_k"] = [{"label": label, "prob": prob} for label, prob in ranked]
        return answer


def _answers(
    predictor: Predictor, inputs: list[list[torch.Tensor]]
) -> list[tuple[torch.Tensor, float | None]]:
    """Each image's probabilities and rejection score (None without a rule), for one batch."""
    probabilities, scores = predictor.batch_answers(stack_inputs(inputs))
    row_scores = scores.tolist() if scores is not None else [None] * len(inputs)
    return list(zip(probabilities, row_scores, strict=True))


def _busy(err: Exception) -> HTTPException:
    return HTTPException(503, f"the server is busy: {err}", {"Retry-After": "1"})


def _explainer(predictor: Predictor) -> Member | None:
    """The member Grad-CAM can explain: it needs gradients through one PyTorch model (a
    checkpoint), not an exported file or an ensemble."""
    explainer = predictor.members[0] if len(predictor.members) == 1 else None
    if explainer is not None and not isinstance(explainer.model, torch.nn.Module):
        explainer = None
    return explainer
