"""The Open Inference Protocol (/v2) driven by tritonclient, the real client, against a live
server on loopback: its answers are predict.py's, its metadata is the model's, and bad requests
get the protocol's errors while the server goes on."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serving import loopback_server
from test_serve import (  # noqa: F401 (fixtures)
    KEY,
    ckpt,
    key,
    predicted,
    row_probabilities,
    serve_config,
    strict_url,
    test_images,
    url,
)
from thaw.data.images import load_image
from thaw.models import load_trained
from thaw.serve import build_app

NAME = "resnet18"  # folder_run's model: the default model_name
# A binary request whose header promises more bytes than follow it.
SHORT_HEADER = (
    b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
    b'"parameters": {"binary_data_size": 9}}]}'
)


def client(base: str, **kwargs) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(base.removeprefix("http://"), **kwargs)


def image_input(paths: list[Path], binary: bool) -> triton.InferInput:
    files = [path.read_bytes() for path in paths]
    data = files if binary else [base64.b64encode(f).decode() for f in files]
    tensor = triton.InferInput("image", [len(paths)], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=object), binary_data=binary)
    return tensor


def assert_predicts(result, paths: list[Path], rows: dict, classes: list[str]) -> None:
    """The protocol's outputs are predict's rows: probabilities to 1e-5, the label, and the
    rule's score (to 1e-4, as test_serve holds it) and known."""
    probs, labels = result.as_numpy("probs"), result.as_numpy("label")
    scores, known = result.as_numpy("score"), result.as_numpy("known")
    assert probs.shape == (len(paths), len(classes))
    for i, path in enumerate(paths):
        row = rows[key(path)]
        expected = row_probabilities(row)
        for c, name in enumerate(classes):
            assert probs[i, c] == pytest.approx(expected[name], abs=1e-5), (path, name)
        label = labels[i]  # bytes from binary data, str from JSON
        assert (label.decode() if isinstance(label, bytes) else label) == row["label"]
        assert scores[i] == pytest.approx(row["score"], abs=1e-4) and bool(known[i]) is row["known"]


@pytest.fixture(scope="module")
def classes(ckpt) -> list[str]:  # noqa: F811
    return load_trained(ckpt).classes


def test_tritonclient_gets_predicts_answers_as_bytes_in_json_and_binary_and_as_pixels(
    url,  # noqa: F811
    test_images,  # noqa: F811
    predicted,  # noqa: F811
    ckpt,  # noqa: F811
    classes,
):
    paths = test_images[:: max(1, len(test_images) // 6)][:6]
    served = client(url)
    as_json = [triton.InferRequestedOutput(n, binary_data=False) for n in ("probs", "label")]
    as_json += [triton.InferRequestedOutput(n, binary_data=False) for n in ("score", "known")]
    result = served.infer(NAME, [image_input(paths, binary=False)], outputs=as_json)
    assert_predicts(result, paths, predicted, classes)
    result = served.infer(NAME, [image_input(paths, binary=True)])  # every output binary
    assert_predicts(result, paths, predicted, classes)

    preprocessing = load_trained(ckpt).preprocessing
    transform = preprocessing.transform()
    pixels = np.stack([transform(load_image(path)).numpy() for path in paths])
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels.astype(np.float32), binary_data=True)
    assert_predicts(served.infer(NAME, [tensor]), paths, predicted, classes)
    tensor.set_data_from_numpy(pixels.astype(np.float32), binary_data=False)
    assert_predicts(served.infer(NAME, [tensor]), paths, predicted, classes)


def test_the_metadata_is_the_models(url, ckpt):  # noqa: F811
    served, trained = client(url), load_trained(ckpt)
    assert served.is_server_live() and served.is_server_ready() and served.is_model_ready(NAME)
    assert "binary_tensor_data" in served.get_server_metadata()["extensions"]
    metadata = served.get_model_metadata(NAME)
    side, classes = trained.preprocessing.input_size, trained.classes
    assert metadata["name"] == NAME and metadata["platform"] == "thaw_checkpoint"
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, side, side]},
    ]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("probs", "FP32", [-1, len(classes)]),
        ("label", "BYTES", [-1]),
        ("score", "FP32", [-1]),
        ("known", "BOOL", [-1]),
    ]
    assert metadata["parameters"]["classes"] == classes
    assert metadata["parameters"]["preprocessing"] == trained.preprocessing.to_dict()


def test_model_name_is_the_serve_option(ckpt, test_images, tmp_path):  # noqa: F811
    app = build_app(serve_config(tmp_path, f"ckpt_path={ckpt}", "model_name=shop"))
    with loopback_server(app) as base:
        served = client(base)
        assert served.is_model_ready("shop") and not served.is_model_ready(NAME)
        result = served.infer("shop", [image_input(test_images[:1], binary=True)])
        assert result.get_response()["model_name"] == "shop"


@pytest.mark.parametrize(
    ("body", "headers", "words"),
    [
        (b"{not json", {}, "the request is not JSON"),
        (b'{"inputs": 3}', {}, "no 'inputs' list"),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 2, 2], '
            b'"data": [0.5, 0.5]}]}',
            {},
            "has 2 elements, its shape [1, 3, 2, 2] says 12",
        ),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 2, 2], '
            b'"data": [' + b",".join([b"0.5"] * 12) + b"]}]}",
            {},
            "input 'pixels' has shape [N, 3, 28, 28], got [1, 3, 2, 2]",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            {},
            "input 'image' must be BYTES",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
            b'"data": ["not base64!"]}]}',
            {},
            "base64 strings",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
            b'"data": ["' + base64.b64encode(b"not an image") + b'"]}]}',
            {},
            "not an image",
        ),
        (
            SHORT_HEADER + b"\x09\x00\x00\x00abc",
            {"Inference-Header-Content-Length": str(len(SHORT_HEADER))},
            "binary_data_size 9 is not the 7 bytes sent",
        ),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, "is not a length"),
    ],
    ids=[
        "not-json",
        "no-inputs",
        "too-few-elements",
        "wrong-pixel-shape",
        "wrong-datatype",
        "bad-base64",
        "not-an-image",
        "short-binary",
        "bad-header-length",
    ],
)
def test_a_malformed_request_gets_400_with_the_protocols_error(url, body, headers, words):  # noqa: F811
    answer = httpx.post(f"{url}/v2/models/{NAME}/infer", content=body, headers=headers)
    assert answer.status_code in (400, 415), answer.text
    assert words in answer.json()["error"]
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}  # still serving


def test_a_wrong_model_name_gets_404_and_the_server_goes_on(url, test_images, predicted, classes):  # noqa: F811
    served = client(url)
    for call in (
        lambda: served.get_model_metadata("nope"),
        lambda: served.infer("nope", [image_input(test_images[:1], binary=True)]),
    ):
        with pytest.raises(InferenceServerException, match="no model 'nope'") as raised:
            call()
        assert raised.value.status() == "404"
    result = served.infer(NAME, [image_input(test_images[:1], True)])
    assert_predicts(result, test_images[:1], predicted, classes)


def test_the_api_key_guards_the_protocol_but_not_its_health(strict_url, test_images, classes):  # noqa: F811
    assert client(strict_url).is_server_live()
    with pytest.raises(InferenceServerException) as raised:
        client(strict_url).get_model_metadata(NAME)
    assert raised.value.status() == "401"
    keyed = {"Authorization": f"Bearer {KEY}"}
    served = client(strict_url)
    assert served.get_model_metadata(NAME, headers=keyed)["name"] == NAME
    result = served.infer(NAME, [image_input(test_images[:1], True)], headers=keyed)
    assert result.as_numpy("label")[0].decode() in classes


def test_the_request_metrics_count_the_protocols_routes(url, test_images):  # noqa: F811
    """By the route's template: one model's infer calls are one line of /metrics."""

    def answered() -> int:
        routes = httpx.get(f"{url}/metrics").json()["routes"]
        return routes.get("/v2/models/{name}/infer", {}).get("requests", {}).get("200", 0)

    before = answered()
    client(url).infer(NAME, [image_input(test_images[:1], True)])
    assert answered() == before + 1
