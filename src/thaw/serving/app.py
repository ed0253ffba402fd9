"""The HTTP API and the web page: FastAPI routes over a Predictor, batched dynamically.

Routes: `POST /predict` (one image, multipart field `file` or the raw body; `?explain=true` adds
its Grad-CAM overlay, for a checkpoint), `POST
/predict/batch` (several multipart files, one result or error each, in order), `GET /health`,
`GET /info`, `GET /metrics` (JSON, or `?format=prometheus`) and the page at `/`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thaw.analysis import gradcam
from thaw.analysis.html import data_uri, png_bytes
from thaw.inference.predictor import Predictor, stack_inputs
from thaw.models.classifier import Classifier
from thaw.serving.batcher import DynamicBatcher, Overloaded
from thaw.serving.metrics import RequestMetrics
from thaw.serving.uploads import UploadError, decode_upload

ROUTES = ("/", "/predict", "/predict/batch", "/health", "/info", "/metrics")
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


def create_app(predictor: Predictor, info: dict[str, Any], settings: ServeSettings) -> FastAPI:
    """The app serving `predictor`; `info` is what /info reports about the model."""
    metrics = RequestMetrics()
    batcher = DynamicBatcher(
        lambda inputs: list(predictor.batch_probabilities(stack_inputs(inputs))),
        settings.max_batch_size,
        settings.batch_timeout_ms / 1000,
        settings.max_pending,
    )
    limit = int(settings.max_upload_mb * MB)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with batcher:
            yield

    app = FastAPI(title="thaw", lifespan=lifespan, docs_url=None, redoc_url=None)
    authorized = [Depends(_bearer_check(settings.api_key))]

    app.add_middleware(Measured, metrics=metrics)

    # Grad-CAM needs gradients through one PyTorch model: a checkpoint, not an exported file.
    explainer = predictor.members[0] if len(predictor.members) == 1 else None
    if explainer is not None and not isinstance(explainer.model, Classifier):
        explainer = None

    async def classify(data: bytes) -> tuple[dict[str, Any], Image.Image]:
        """One upload's answer and its decoded image, or the UploadError that says what is
        wrong with it."""
        with batcher.coming():
            image, inputs = await run_in_threadpool(prepare, data)
        try:
            probabilities = await batcher.submit(inputs)
        except Overloaded as err:
            raise HTTPException(503, f"the server is busy: {err}", {"Retry-After": "1"}) from None
        return answer(probabilities), image

    def prepare(data: bytes) -> tuple[Image.Image, list[torch.Tensor]]:
        image = decode_upload(data, predictor.decode_size)
        return image, predictor.prepare(image)

    async def explanation(image: Image.Image, label: str) -> str:
        """The Grad-CAM overlay of `label` on the model's view of `image`, as a PNG data URI."""
        assert explainer is not None
        target = predictor.classes.index(label)
        model, preprocessing = explainer.model, explainer.preprocessing
        ((_, picture),) = await batcher.run_alone(
            lambda: gradcam.explain(model, preprocessing, [image], [target])
        )
        return data_uri(png_bytes(picture))

    def answer(probabilities: torch.Tensor) -> dict[str, Any]:
        ranked = predictor.top_k(probabilities[None], settings.top_k)[0]
        return {
            "label": ranked[0][0],
            "prob": ranked[0][1],
            "top_k": [{"label": label, "prob": prob} for label, prob in ranked],
        }

    @app.post("/predict", dependencies=authorized)
    async def predict(request: Request, explain: bool = False) -> JSONResponse:
        if explain and explainer is None:
            raise HTTPException(
                400,
                "explain=true needs the PyTorch model: serve a checkpoint (ckpt_path=...), "
                "not an exported file or an ensemble",
            )
        body = await read_body(request, limit)
        if _is_multipart(request):
            form = await parse_form(request, body)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "send the image as the multipart field 'file'")
            body = await upload.read()
        try:
            result, image = await classify(body)
        except UploadError as err:
            raise HTTPException(err.status, err.detail) from None
        if explain:
            result["explanation"] = await explanation(image, result["label"])
        return JSONResponse(result)

    @app.post("/predict/batch", dependencies=authorized)
    async def predict_batch(request: Request) -> JSONResponse:
        body = await read_body(request, limit)
        if not _is_multipart(request):
            raise HTTPException(400, "send the images as multipart/form-data files")
        uploads = [v for _, v in (await parse_form(request, body)).multi_items()]
        uploads = [u for u in uploads if isinstance(u, UploadFile)]
        if not uploads:
            raise HTTPException(400, "the request holds no files: send them as multipart files")

        async def one(upload: UploadFile) -> dict[str, Any]:
            try:
                result, _ = await classify(await upload.read())
                return {"file": upload.filename, **result}
            except UploadError as err:
                return {"file": upload.filename, "error": err.detail, "status": err.status}

        return JSONResponse(await asyncio.gather(*(one(upload) for upload in uploads)))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def model_info() -> dict[str, Any]:
        return {
            **info,
            "top_k": settings.top_k,
            "max_batch_size": settings.max_batch_size,
            "max_upload_mb": settings.max_upload_mb,
            "auth": settings.api_key is not None,
            "explain": explainer is not None,
        }

    @app.get("/metrics", response_model=None)
    async def report(format: str = "json") -> dict[str, Any] | PlainTextResponse:
        if format == "prometheus":
            return PlainTextResponse(metrics.prometheus(batcher.batch_sizes))
        return metrics.summary(batcher.batch_sizes)

    page = files("thaw.serving").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    return app


class Measured:
    """ASGI middleware that records every HTTP request's route, status and time in `metrics`.
    A plain ASGI layer: Starlette's BaseHTTPMiddleware costs a task and a stream per request."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.record(route, status, time.perf_counter() - start)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes (by
    its Content-Length, or while it streams in)."""
    refuse = HTTPException(
        413, f"the upload is over the limit of {limit / MB:g} MB (max_upload_mb)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise refuse
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise refuse
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_form(request: Request, body: bytes) -> FormData:
    """The multipart form in `body`, already read under the size limit."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, replay).form()


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


def _bearer_check(api_key: str | None) -> Callable[..., None]:
    """A dependency that lets a request through only with `Authorization: Bearer <api_key>`
    (every request, where no key is set)."""
    expected = f"Bearer {api_key}".encode()

    def check(authorization: str = Header(default="")) -> None:
        if api_key is not None and not hmac.compare_digest(authorization.encode(), expected):
            raise HTTPException(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <api_key>'",
                {"WWW-Authenticate": "Bearer"},
            )

    return check
