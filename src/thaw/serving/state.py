"""What one app serves with: its settings and the Predictor behind its batcher, on `app.state`.

The routes are module-level (routes.py), so each app keeps its own model, queue and counters
here rather than in a closure; several apps in one process (the tests) stay apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import torch
from fastapi import HTTPException
from PIL import Image
from starlette.concurrency import run_in_threadpool

from thaw.analysis import gradcam
from thaw.analysis.html import data_uri, png_bytes
from thaw.inference.predictor import Member, Predictor, stack_inputs
from thaw.serving.batcher import DynamicBatcher, Overloaded
from thaw.serving.metrics import RequestMetrics
from thaw.serving.uploads import decode_upload

MB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """What bounds the server: batching, upload size, queue length, and the answer's top-k."""

    max_batch_size: int = 32
    batch_timeout_ms: float = 5.0
    max_upload_mb: float = 10.0
    max_pending: int = 256
    top_k: int = 5
    api_key: str | None = None


@dataclass
class ServeState:
    """One app's model, settings, batcher and counters; `info` is what /info says of the model."""

    predictor: Predictor
    info: dict[str, Any]
    settings: ServeSettings
    batcher: DynamicBatcher
    metrics: RequestMetrics
    explainer: Member | None
    page: str

    @classmethod
    def build(
        cls, predictor: Predictor, info: dict[str, Any], settings: ServeSettings
    ) -> ServeState:
        batcher = DynamicBatcher(
            lambda inputs: list(predictor.batch_probabilities(stack_inputs(inputs))),
            settings.max_batch_size,
            settings.batch_timeout_ms / 1000,
            settings.max_pending,
        )
        page = files("thaw.serving").joinpath("page.html").read_text()
        return cls(
            predictor, info, settings, batcher, RequestMetrics(), _explainer(predictor), page
        )

    @property
    def upload_limit(self) -> int:
        return int(self.settings.max_upload_mb * MB)

    async def classify(self, data: bytes) -> tuple[dict[str, Any], Image.Image]:
        """One upload's answer and its decoded image, or the UploadError that says what is
        wrong with it."""
        with self.batcher.coming():
            image, inputs = await run_in_threadpool(self._prepare, data)
        try:
            probabilities = await self.batcher.submit(inputs)
        except Overloaded as err:
            raise HTTPException(503, f"the server is busy: {err}", {"Retry-After": "1"}) from None
        return self._answer(probabilities), image

    async def explanation(self, image: Image.Image, label: str) -> str:
        """The Grad-CAM overlay of `label` on the model's view of `image`, as a PNG data URI."""
        assert self.explainer is not None
        target = self.predictor.classes.index(label)
        model, preprocessing = self.explainer.model, self.explainer.preprocessing
        ((_, picture),) = await self.batcher.run_alone(
            lambda: gradcam.explain(model, preprocessing, [image], [target])
        )
        return data_uri(png_bytes(picture))

    def _prepare(self, data: bytes) -> tuple[Image.Image, list[torch.Tensor]]:
        image = decode_upload(data, self.predictor.decode_size)
        return image, self.predictor.prepare(image)

    def _answer(self, probabilities: torch.Tensor) -> dict[str, Any]:
        ranked = self.predictor.top_k(probabilities[None], self.settings.top_k)[0]
        return {
            "label": ranked[0][0],
            "prob": ranked[0][1],
            "top_k": [{"label": label, "prob": prob} for label, prob in ranked],
        }


def _explainer(predictor: Predictor) -> Member | None:
    """The member Grad-CAM can explain: it needs gradients through one PyTorch model (a
    checkpoint), not an exported file or an ensemble."""
    explainer = predictor.members[0] if len(predictor.members) == 1 else None
    if explainer is not None and not isinstance(explainer.model, torch.nn.Module):
        explainer = None
    return explainer
