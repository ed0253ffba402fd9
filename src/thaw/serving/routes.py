"""The routes, module-level: each reads its app's ServeState from `request.app.state.serve`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.datastructures import FormData, UploadFile

from thaw.serving.state import MB, ServeState
from thaw.serving.uploads import UploadError


def state_of(request: Request) -> ServeState:
    return request.app.state.serve


router = APIRouter()


@router.post("/predict")
async def predict(request: Request, explain: bool = False) -> JSONResponse:
    serve = state_of(request)
    if explain and serve.explainer is None:
        raise HTTPException(
            400,
            "explain=true needs the PyTorch model: serve a checkpoint (ckpt_path=...), "
            "not an exported file or an ensemble",
        )
    body = await read_body(request, serve.upload_limit, serve.settings.body_timeout_s)
    if _is_multipart(request):
        form = await parse_form(request, body)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, "send the image as the multipart field 'file'")
        body = await upload.read()
    try:
        return JSONResponse(await serve.classify(body, explain))
    except UploadError as err:
        raise HTTPException(err.status, err.detail) from None


@router.post("/predict/batch")
async def predict_batch(request: Request) -> JSONResponse:
    serve = state_of(request)
    body = await read_body(request, serve.upload_limit, serve.settings.body_timeout_s)
    if not _is_multipart(request):
        raise HTTPException(400, "send the images as multipart/form-data files")
    uploads = [v for _, v in (await parse_form(request, body)).multi_items()]
    uploads = [u for u in uploads if isinstance(u, UploadFile)]
    if not uploads:
        raise HTTPException(400, "the request holds no files: send them as multipart files")
    limit = serve.settings.max_pending
    if len(uploads) > limit:  # the queue could never hold them: a retry cannot succeed
        raise HTTPException(
            413,
            f"the batch holds {len(uploads)} files, more than the {limit} the server queues "
            f"at once (max_pending): send at most {limit} files a request",
        )

    turn = asyncio.Lock()  # the files wait for the decode budget one after another

    async def one(upload: UploadFile) -> dict[str, Any]:
        try:
            answer = await serve.classify(await upload.read(), turn=turn)
            return {"file": upload.filename, **answer}
        except UploadError as err:
            return {"file": upload.filename, "error": err.detail, "status": err.status}

    # A refusal (503) answers the whole request: the other files' work is cancelled, and the
    # batcher drops their queued images before they reach the model.
    tasks = [asyncio.ensure_future(one(upload)) for upload in uploads]
    try:
        return JSONResponse(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/info")
async def model_info(request: Request) -> dict[str, Any]:
    serve = state_of(request)
    settings = serve.settings
    return {
        **serve.info,
        "top_k": settings.top_k,
        "reject": settings.reject,
        "max_batch_size": settings.max_batch_size,
        "max_upload_mb": settings.max_upload_mb,
        "auth": settings.api_key is not None,
        "explain": serve.explainer is not None,
    }


@router.get("/metrics", response_model=None)
async def report(request: Request, format: str = "json") -> dict[str, Any] | PlainTextResponse:
    serve = state_of(request)
    now = {"pending_images": serve.batcher.waiting, "pixels_in_flight": serve.budget.in_flight}
    if format == "prometheus":
        return PlainTextResponse(serve.metrics.prometheus(serve.batcher.batch_sizes, now))
    return serve.metrics.summary(serve.batcher.batch_sizes, now)


@router.get("/", response_class=HTMLResponse)
async def index(request: Request) -> str:
    return state_of(request).page


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes (by
    its Content-Length, or while it streams in), and with 408 (closing the connection) if it
    has not all come within `timeout_s`: a client that drips its body holds a request open."""
    refuse = HTTPException(
        413, f"the upload is over the limit of {limit / MB:g} MB (max_upload_mb)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise refuse

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise refuse
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:  # noqa: UP041 (Python 3.10's is not the builtin)
        raise HTTPException(
            408,
            f"the request body did not all arrive within {timeout_s:g} s (body_timeout_s)",
            {"Connection": "close"},
        ) from None


async def parse_form(request: Request, body: bytes) -> FormData:
    """The multipart form in `body`, already read under the size limit."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, replay).form()


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")
