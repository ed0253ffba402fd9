"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) beside thaw's own routes, on
the same batcher and Predictor, so KServe's, Seldon's and Triton's clients work unchanged.

    GET  /v2/health/live, /v2/health/ready     open, as /health is
    GET  /v2                                   the server's name, version and extensions
    GET  /v2/models/{name}[/ready]             the model's inputs and outputs; whether it is ready
    POST /v2/models/{name}/infer               an inference request

An inference request gives one input: `image`, BYTES [N], encoded image files (in JSON each
element is a base64 string, since JSON strings cannot hold raw bytes; with the binary-data
extension the raw files), or `pixels`, FP32 [N, 3, S, S], already preprocessed as the metadata's
`parameters` say. It answers `probs` FP32 [N, C] and `label` BYTES [N] (a multi-label model's
label set joined by |, as predict writes it), and `score` FP32 [N] and `known` BOOL [N] when the
model has a rejection rule (with reject=true, `label` is the rule's for an image not known). An
output is sent as binary data where the request asks (an output's `binary_data`, or
`binary_data_output` for all). Errors are the protocol's `{"error": ...}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from thaw import __version__
from thaw.data.sources.csv import LABEL_SEPARATOR
from thaw.inference.predictor import judged
from thaw.serving.routes import read_body, state_of
from thaw.serving.state import ServeState
from thaw.serving.uploads import UploadError

HEADER_LENGTH = "Inference-Header-Content-Length"
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
# Every route, as the request metrics name it.
PATHS = (*OPEN_PATHS, "/v2", "/v2/models/{name}", "/v2/models/{name}/ready")
PATHS += ("/v2/models/{name}/infer",)

router = APIRouter(prefix="/v2")


class ProtocolError(Exception):
    """A request the protocol refuses: `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(err: ProtocolError) -> JSONResponse:
    return JSONResponse({"error": str(err)}, err.status)


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready() -> dict[str, bool]:
    return {"ready": True}


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "thaw", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/models/{name}")
async def model_metadata(request: Request, name: str) -> Response:
    serve = state_of(request)
    try:
        _check_name(serve, name)
    except ProtocolError as err:
        return error_response(err)
    return JSONResponse(metadata(serve))


@router.get("/models/{name}/ready")
async def model_ready(request: Request, name: str) -> Response:
    try:
        _check_name(state_of(request), name)
    except ProtocolError as err:
        return error_response(err)
    return JSONResponse({"name": name, "ready": True})


@router.post("/models/{name}/infer")
async def infer(request: Request, name: str) -> Response:
    serve = state_of(request)
    try:
        _check_name(serve, name)
        body = await read_body(request, serve.upload_limit, serve.settings.body_timeout_s)
        header, tensors = parse_request(body, request.headers.get(HEADER_LENGTH))
        answers = await _answers(serve, *_the_input(header, tensors))
        return encode_response(serve, name, header, answers)
    except ProtocolError as err:
        return error_response(err)
    except UploadError as err:
        return error_response(ProtocolError(err.status, err.detail))
    except HTTPException as err:  # the body's limits (413, 408) and a busy server (503)
        return JSONResponse({"error": err.detail}, err.status_code, err.headers)


def metadata(serve: ServeState) -> dict[str, Any]:
    """The model's metadata: inputs, outputs, datatypes and shapes (-1: any batch size), and in
    `parameters` the preprocessing that `pixels` must already have had."""
    predictor = serve.predictor
    preprocessing = predictor.members[0].preprocessing
    side = preprocessing.input_size
    outputs = [
        {"name": "probs", "datatype": "FP32", "shape": [-1, len(predictor.classes)]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    if predictor.rejection is not None:
        outputs += [
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "known", "datatype": "BOOL", "shape": [-1]},
        ]
    return {
        "name": served_name(serve),
        "versions": ["1"],
        "platform": f"thaw_{serve.info['model']['format']}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, side, side]},
        ],
        "outputs": outputs,
        "parameters": {"classes": predictor.classes, "preprocessing": preprocessing.to_dict()},
    }


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The request's JSON header and the binary data after it (the binary-data extension)."""
    if header_length is None:
        split = len(body)
    elif header_length.isdigit() and int(header_length) <= len(body):
        split = int(header_length)
    else:
        raise ProtocolError(400, f"{HEADER_LENGTH}: {header_length!r} is not a length in the body")
    try:
        header = json.loads(body[:split])
    except ValueError as err:
        raise ProtocolError(400, f"the request is not JSON: {err}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError(400, "the request has no 'inputs' list")
    return header, body[split:]


def _the_input(header: dict[str, Any], binary: bytes) -> tuple[str, Any]:
    """("image", [encoded files]) or ("pixels", an (N, 3, S, S) float array)."""
    inputs = header["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, "give exactly one input: 'image' (BYTES) or 'pixels' (FP32)")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    expected = {"image": "BYTES", "pixels": "FP32"}
    if name not in expected:
        raise ProtocolError(400, f"unknown input {name!r}: give 'image' (BYTES) or 'pixels' (FP32)")
    if datatype != expected[name]:
        raise ProtocolError(400, f"input {name!r} must be {expected[name]}, got {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(400, f"input {name!r} has no valid shape: {shape!r}")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise ProtocolError(
                400, f"binary_data_size {size!r} is not the {len(binary)} bytes sent"
            )
        data = _binary_elements(binary, datatype)
    elif "data" in tensor:
        data = _json_elements(tensor["data"], datatype)
    else:
        raise ProtocolError(400, f"input {name!r} has neither 'data' nor binary data")
    count = int(np.prod(shape)) if shape else 0
    if len(data) != count:
        raise ProtocolError(
            400, f"input {name!r} has {len(data)} elements, its shape {shape} says {count}"
        )
    if name == "image":
        if len(shape) != 1:
            raise ProtocolError(400, f"input 'image' has shape [N] (one file each), got {shape}")
        return name, data
    return name, np.asarray(data, dtype=np.float32).reshape(shape)


def _binary_elements(data: bytes, datatype: str) -> np.ndarray | list[bytes]:
    """FP32 as an array read in place; BYTES as its elements."""
    if datatype == "FP32":
        if len(data) % 4:
            raise ProtocolError(400, "FP32 binary data is not a whole number of floats")
        return np.frombuffer(data, dtype="<f4")
    elements, at = [], 0
    while at < len(data):  # BYTES: each element a 4-byte little-endian length, then its bytes
        if at + 4 > len(data):
            raise ProtocolError(400, "BYTES binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, at)
        if at + 4 + length > len(data):
            raise ProtocolError(400, "BYTES binary data ends inside an element")
        elements.append(data[at + 4 : at + 4 + length])
        at += 4 + length
    return elements


def _json_elements(data: Any, datatype: str) -> list[Any]:
    flat = list(_flatten(data))
    if datatype == "FP32":
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise ProtocolError(400, "FP32 data must be numbers")
        return flat
    try:
        return [base64.b64decode(v, validate=True) for v in flat]
    except (TypeError, ValueError, binascii.Error):
        raise ProtocolError(
            400, "BYTES data in JSON must be base64 strings of the image files"
        ) from None


def _flatten(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


async def _answers(
    serve: ServeState, kind: str, data: Any
) -> list[tuple[torch.Tensor, float | None]]:
    """Each image's (probabilities, rejection score), through the batcher as every route's."""
    if kind == "image":
        return [await serve.infer(file) for file in data]
    pixels = torch.from_numpy(data)
    side = serve.predictor.members[0].preprocessing.input_size
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, side, side):
        raise ProtocolError(
            400, f"input 'pixels' has shape [N, 3, {side}, {side}], got {list(pixels.shape)}"
        )
    if len(serve.predictor.members) != 1 or serve.predictor.tta != "none":
        raise ProtocolError(400, "input 'pixels' needs one model without TTA: send 'image'")
    return [await serve.infer_prepared([row]) for row in pixels]


def encode_response(
    serve: ServeState,
    name: str,
    header: dict[str, Any],
    answers: list[tuple[torch.Tensor, float | None]],
) -> Response:
    """The outputs, JSON or (where asked) binary, for the model's answers."""
    predictor = serve.predictor
    probs = (
        torch.stack([p for p, _ in answers]) if answers else torch.empty(0, len(predictor.classes))
    )
    labels, scores, known = [], [], []
    if predictor.thresholds is not None:  # label sets, as predict's labels column writes them
        sets = predictor.label_sets(probs)
        labels = [LABEL_SEPARATOR.join(label for label, _ in found) for found in sets]
    else:
        for probabilities, score in answers:
            top = predictor.classes[int(probabilities.argmax())]
            judgement = judged(predictor.rejection, top, score, serve.settings.reject)
            labels.append(judgement["label"])
            if predictor.rejection is not None:
                scores.append(float(judgement["score"]))
                known.append(bool(judgement["known"]))
    values: dict[str, tuple[str, list[int], Any]] = {
        "probs": ("FP32", list(probs.shape), probs.numpy().astype("<f4")),
        "label": ("BYTES", [len(labels)], labels),
    }
    if predictor.rejection is not None:
        values["score"] = ("FP32", [len(scores)], np.asarray(scores, dtype="<f4"))
        values["known"] = ("BOOL", [len(known)], np.asarray(known, dtype=bool))
    asked = header.get("outputs")
    all_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    wanted = {o.get("name"): o for o in asked} if isinstance(asked, list) else dict.fromkeys(values)
    unknown = [n for n in wanted if n not in values]
    if unknown:
        raise ProtocolError(400, f"unknown outputs {unknown}: the outputs are {list(values)}")
    outputs, blobs = [], []
    for output, requested in wanted.items():
        datatype, shape, data = values[output]
        binary = all_binary or bool(((requested or {}).get("parameters") or {}).get("binary_data"))
        tensor: dict[str, Any] = {"name": output, "datatype": datatype, "shape": shape}
        if binary:
            blob = _binary_bytes(datatype, data)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = data if datatype == "BYTES" else np.asarray(data).flatten().tolist()
        outputs.append(tensor)
    response = {"model_name": name, "model_version": "1", "outputs": outputs}
    if "id" in header:
        response["id"] = header["id"]
    text = json.dumps(response).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(text))}
    return Response(text + b"".join(blobs), headers=headers, media_type="application/octet-stream")


def _binary_bytes(datatype: str, data: Any) -> bytes:
    if datatype == "BYTES":
        encoded = [str(value).encode() for value in data]
        return b"".join(struct.pack("<I", len(v)) + v for v in encoded)
    return np.ascontiguousarray(data).tobytes()


def served_name(serve: ServeState) -> str:
    """The serve option model_name, or the run's model name (an ensemble's "a+b" as "a_b")."""
    given = serve.settings.model_name
    return given if given is not None else re.sub(r"[^\w.-]", "_", serve.info["model"]["name"])


def is_model_name(name: Any) -> bool:
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) is not None


def _check_name(serve: ServeState, name: str) -> None:
    if name != served_name(serve):
        raise ProtocolError(404, f"no model {name!r}: this server serves {served_name(serve)!r}")
