"""The HTTP API and the web page: FastAPI routes over a Predictor, batched dynamically.

Routes: `POST /predict` (one image, multipart field `file` or the raw body; `?explain=true` adds
its Grad-CAM overlay, for a checkpoint), `POST /predict/batch` (several multipart files, one
result or error each, in order), `GET /health`, `GET /info`, `GET /metrics` (JSON, or
`?format=prometheus`) and the page at `/`. A model with a rejection rule adds `score` and
`known` to every answer (ServeState._answer). The Open Inference Protocol's routes, under /v2,
share the batcher (oip.py). The routes live in routes.py and oip.py, one app's state in state.py;
this module puts them together.

With an API key, every path but OPEN needs it, /openapi.json and paths that do not exist
included: what is open is listed, not what is closed. /docs and /redoc are not served (their
pages load Swagger UI from a CDN).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thaw.inference.predictor import Predictor
from thaw.serving import oip
from thaw.serving.metrics import RequestMetrics
from thaw.serving.routes import router
from thaw.serving.state import MB, ServeSettings, ServeState

__all__ = ["MB", "OPEN", "ROUTES", "Guarded", "Measured", "ServeSettings", "create_app"]

ROUTES = ("/", "/predict", "/predict/batch", "/health", "/info", "/metrics", *oip.PATHS)
OPEN = frozenset({"/", "/health", "/info", *oip.OPEN_PATHS})


def create_app(predictor: Predictor, info: dict[str, Any], settings: ServeSettings) -> FastAPI:
    """The app serving `predictor`; `info` is what /info reports about the model."""
    state = ServeState.build(predictor, info, settings)
    app = FastAPI(title="thaw", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    if settings.api_key is not None:
        app.add_middleware(Guarded, api_key=settings.api_key)
    app.add_middleware(Measured, metrics=state.metrics)  # outermost: it counts the 401s too
    app.include_router(router)
    app.include_router(oip.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The batcher's loop runs while the app does."""
    async with app.state.serve.batcher:
        yield


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
            # The route's template (/v2/models/{name}/infer), which routing left in the scope.
            template = getattr(scope.get("route"), "path", scope["path"])
            route = template if template in ROUTES else "other"
            self.metrics.record(route, status, time.perf_counter() - start)


class Guarded:
    """ASGI middleware that lets an HTTP request through to a path outside OPEN only with the
    header `Authorization: Bearer <api_key>` (compared in constant time); 401 otherwise."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = JSONResponse(
                    {
                        "detail": "missing or wrong API key: send the header "
                        "'Authorization: Bearer <api_key>'"
                    },
                    401,
                    {"WWW-Authenticate": "Bearer"},
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
