"""serve.py on a model trained on real photos, over a real loopback port: answers equal to
predict's, batches with a bad file, every kind of bad input refused without harm to the server,
the API key, concurrency, /info and /metrics, ONNX, several workers, the rejection rule's score,
known and label, and the page in chromium."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FOLDER_CLASSES, run_cli
from data_formats import write_truncated_jpeg
from serving import loopback_server, stop
from thaw.analysis.gradcam import explain
from thaw.checkpoint import DIGEST_KEY, REJECTION_PREFIX, file_identity, update_run_record
from thaw.config import compose_config
from thaw.errors import UserError
from thaw.export import export_model
from thaw.models import load_trained
from thaw.predict import predict
from thaw.serve import build_app, settings_from
from thaw.serving.batcher import DynamicBatcher, Overloaded
from thaw.serving.uploads import decode_upload

ROOT = Path(__file__).resolve().parents[1]
KEY = "s3cret"


def serve_config(tmp_path: Path, *overrides: str):
    return compose_config("serve", ["device=cpu", *overrides], tmp_path)


@pytest.fixture(scope="module")
def ckpt(folder_run: Path) -> Path:
    return folder_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def test_images(photo_folder: Path) -> list[Path]:
    return sorted((photo_folder / "test").rglob("*.png"))


def predict_rows(ckpt: Path, inputs: Path, out: Path, *overrides: str) -> dict[str, dict]:
    """predict.py's row (its JSON) for each image, by `key`."""
    cfg = compose_config(
        "predict",
        ["device=cpu", f"ckpt_path={ckpt}", f"inputs={inputs}", "out=p.json", *overrides],
        out,
    )
    return {key(Path(row["path"])): row for row in json.loads(predict(cfg).read_text())}


@pytest.fixture(scope="module")
def predicted(ckpt: Path, test_images: list[Path], tmp_path_factory) -> dict[str, dict]:
    """predict.py's row for each test image, by `key`: folder_run's model has a rejection rule,
    so each has its score and known."""
    return predict_rows(ckpt, test_images[0].parents[1], tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def url(ckpt: Path, tmp_path_factory) -> str:
    app = build_app(serve_config(tmp_path_factory.mktemp("serve"), f"ckpt_path={ckpt}"))
    with loopback_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def doubtful(ckpt: Path, predicted: dict[str, dict], tmp_path_factory) -> Path:
    """folder_run's checkpoint with its rule's threshold raised to the median score of the test
    images: half of them are not known."""
    path = tmp_path_factory.mktemp("doubtful") / "best.ckpt"
    shutil.copy(ckpt, path)
    postprocessing = load_trained(ckpt).postprocessing
    threshold = statistics.median(row["score"] for row in predicted.values())
    rule = dataclasses.replace(postprocessing.rejection, threshold=threshold)
    raised = dataclasses.replace(postprocessing, rejection=rule)
    update_run_record(path, postprocessing=raised.to_dict())  # its weights digest re-stamped
    return path


@pytest.fixture(scope="module")
def rejected(doubtful: Path, test_images: list[Path], tmp_path_factory) -> dict[str, dict]:
    """predict.py's rows for the test images with `doubtful` and reject=true."""
    out = tmp_path_factory.mktemp("rejected")
    return predict_rows(doubtful, test_images[0].parents[1], out, "reject=true")


@pytest.fixture(scope="module")
def rejecting_url(doubtful: Path, tmp_path_factory) -> str:
    cfg = serve_config(tmp_path_factory.mktemp("rejecting"), f"ckpt_path={doubtful}", "reject=true")
    with loopback_server(build_app(cfg)) as base:
        yield base


@pytest.fixture(scope="module")
def strict_url(ckpt: Path, tmp_path_factory) -> str:
    """A server with an API key (from THAW_API_KEY) and a 0.05 MB upload limit."""
    cfg = serve_config(tmp_path_factory.mktemp("strict"), f"ckpt_path={ckpt}", "max_upload_mb=0.05")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("THAW_API_KEY", KEY)
        app = build_app(cfg)
    with loopback_server(app) as base:
        yield base


def key(path: Path) -> str:
    """class/file name: the file names repeat across the class folders."""
    return f"{path.parent.name}/{path.name}"


def as_probabilities(answer: dict) -> dict[str, float]:
    return {entry["label"]: entry["prob"] for entry in answer["top_k"]}


def row_probabilities(row: dict) -> dict[str, float]:
    """{class: probability} of a predict row."""
    k = len(FOLDER_CLASSES)
    return {row[f"top{i}_label"]: row[f"top{i}_prob"] for i in range(1, k + 1)}


def assert_same(answer: dict, row: dict) -> None:
    """A served answer is predict's `row`: the probabilities to 1e-5, the label, and the score
    and known where the model has a rejection rule, absent where it has none. The score is held
    to 1e-4, as the ONNX graph's is: the batch an image is in moves it in float32 (by up to 2e-5
    here, the same between predict's batch_size=1 and its 64), its Mahalanobis distance
    amplifying the features' rounding."""
    got, expected = as_probabilities(answer), row_probabilities(row)
    assert set(got) == set(expected)
    for label, prob in expected.items():
        assert got[label] == pytest.approx(prob, abs=1e-5), label
    assert answer["top_k"][0]["label"] == row["top1_label"] and answer["label"] == row["label"]
    assert answer["prob"] == answer["top_k"][0]["prob"]
    if "score" in row:
        assert answer["score"] == pytest.approx(row["score"], abs=1e-4)
        assert answer["known"] is row["known"]
    else:
        assert "score" not in answer and "known" not in answer


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header declares `width` x `height`: a decompression bomb's signature."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # and its checksum
    return bytes(data)


def test_served_answers_equal_predicts(url, test_images, predicted):
    with httpx.Client(base_url=url) as client:
        for path in test_images:
            multipart = client.post("/predict", files={"file": (path.name, path.read_bytes())})
            raw = client.post("/predict", content=path.read_bytes())
            for response in (multipart, raw):
                assert response.status_code == 200, response.text
                assert_same(response.json(), predicted[key(path)])


def test_a_batch_answers_each_file_and_a_bad_one_gets_its_own_error(
    url, test_images, predicted, tmp_path
):
    truncated = write_truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    files = [
        ("files", (test_images[0].name, test_images[0].read_bytes())),
        ("files", ("cut.jpg", truncated)),
        ("files", ("notes.txt", b"not an image")),
        ("files", (test_images[-1].name, test_images[-1].read_bytes())),
    ]
    response = httpx.post(f"{url}/predict/batch", files=files)
    assert response.status_code == 200, response.text
    first, cut, text, last = response.json()
    assert [r["file"] for r in (first, cut, text, last)] == [f[1][0] for f in files]
    assert_same(first, predicted[key(test_images[0])])
    assert_same(last, predicted[key(test_images[-1])])
    assert cut["status"] == 400 and "could not decode" in cut["error"] and "label" not in cut
    assert text["status"] == 415 and "not an image" in text["error"]


@pytest.mark.parametrize(
    ("method", "route", "request_args", "status", "words"),
    [
        ("POST", "/predict", {"content": b"plain text, not a picture"}, 415, "not an image"),
        ("POST", "/predict", {"files": {"file": ("a.txt", b"%PDF-1.4")}}, 415, "not an image"),
        ("POST", "/predict", {"content": png_declaring(100_000, 100_000)}, 413, "too large"),
        ("POST", "/predict", {"content": png_declaring(12_000, 12_000)}, 413, "12000x12000"),
        ("POST", "/predict", {"content": b""}, 400, "empty"),
        ("POST", "/predict", {"files": {"image": ("a.png", b"x")}}, 400, "field 'file'"),
        ("POST", "/predict/batch", {"content": b"raw"}, 400, "multipart"),
        ("POST", "/predict/batch", {"data": {"note": "no files"}}, 400, "multipart"),
        ("GET", "/predict", {}, 405, "Method Not Allowed"),
        ("PUT", "/predict/batch", {}, 405, "Method Not Allowed"),
        ("POST", "/health", {}, 405, "Method Not Allowed"),
        # A server-side path is never read: as a form value or as the body, it is not an image.
        ("POST", "/predict", {"files": {"file": (None, "/etc/passwd")}}, 400, "field 'file'"),
        ("POST", "/predict", {"data": {"file": "/etc/passwd"}}, 415, "not an image"),
    ],
)
def test_bad_input_gets_its_status_and_the_server_goes_on(
    url, test_images, predicted, method, route, request_args, status, words
):
    with httpx.Client(base_url=url) as client:
        response = client.request(method, route, **request_args)
        assert response.status_code == status, response.text
        assert words in response.json()["detail"]
        good = client.post("/predict", content=test_images[0].read_bytes())
        assert good.status_code == 200
        assert_same(good.json(), predicted[key(test_images[0])])


def test_an_upload_over_the_limit_gets_413_and_the_key_guards_predict(strict_url, test_images):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = os.urandom(60 * 1024)  # over 0.05 MB
    with httpx.Client(base_url=strict_url) as client:
        assert client.post("/predict", content=big, headers=auth).status_code == 413
        response = client.post("/predict/batch", files=[("files", ("a.png", big))], headers=auth)
        assert response.status_code == 413
        assert "max_upload_mb" in response.json()["detail"]

        image = test_images[0].read_bytes()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for route in ("/predict", "/predict/batch"):
                response = client.post(route, files={"file": ("a.png", image)}, headers=headers)
                assert response.status_code == 401, (route, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        assert client.post("/predict", content=image, headers=auth).status_code == 200
        batch = client.post("/predict/batch", files={"file": ("a.png", image)}, headers=auth)
        assert batch.status_code == 200 and batch.json()[0]["label"] in FOLDER_CLASSES
        for route in ("/", "/health", "/info"):
            assert client.get(route).status_code == 200, route
        assert client.get("/info").json()["auth"] is True


def test_with_a_key_only_the_page_health_and_info_are_open(strict_url, ckpt):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=strict_url) as client:
        for route in ("/metrics", "/openapi.json", "/docs", "/redoc", "/no/such/route"):
            response = client.get(route)
            assert response.status_code == 401, route
            assert "API key" in response.json()["detail"]
        assert client.get("/metrics", headers=auth).status_code == 200
        assert "/predict/batch" in client.get("/openapi.json", headers=auth).json()["paths"]
        assert client.get("/docs", headers=auth).status_code == 404  # not served at all
        info = client.get("/info")
    assert info.status_code == 200
    assert info.json()["model"]["files"] == [file_identity(ckpt)]
    assert info.json()["model"]["files"][0]["file"] == "best.ckpt"

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert not [s for s in strings(info.json()) if os.path.isabs(s)]  # no server path
    assert str(ckpt.parent) not in info.text


def test_sixteen_clients_at_once_all_get_predicts_answers(url, test_images, predicted):
    def client_session(offset: int) -> list[tuple[str, httpx.Response]]:
        with httpx.Client(base_url=url, timeout=60) as client:
            paths = [test_images[(offset + i) % len(test_images)] for i in range(4)]
            return [(key(p), client.post("/predict", content=p.read_bytes())) for p in paths]

    before = httpx.get(f"{url}/metrics").json()
    with ThreadPoolExecutor(16) as pool:
        sessions = list(pool.map(client_session, range(16)))
    answers = [answer for session in sessions for answer in session]
    assert len(answers) == 64
    for name, response in answers:
        assert response.status_code == 200, response.text
        assert_same(response.json(), predicted[name])
    after = httpx.get(f"{url}/metrics").json()
    served = after["batches"]["images"] - before["batches"]["images"]
    assert served == 64
    ok = (
        after["routes"]["/predict"]["requests"]["200"]
        - before["routes"]["/predict"]["requests"]["200"]
    )
    assert ok == 64


def test_explain_adds_the_grad_cam_overlay_that_predict_draws(url, ckpt, test_images):
    image = test_images[0].read_bytes()
    response = httpx.post(f"{url}/predict", params={"explain": "true"}, content=image)
    assert response.status_code == 200, response.text
    answer = response.json()
    prefix = "data:image/png;base64,"
    assert answer["explanation"].startswith(prefix)
    served = Image.open(io.BytesIO(base64.b64decode(answer["explanation"][len(prefix) :])))
    trained = load_trained(ckpt)
    decoded = decode_upload(image, trained.preprocessing.resize_size)
    target = trained.classes.index(answer["label"])
    ((_, expected),) = explain(trained, trained.preprocessing, [decoded], [target])
    assert served.size == expected.size == (28, 28)
    difference = np.abs(np.asarray(served, int) - np.asarray(expected, int))
    assert difference.max() <= 1  # the same map, up to rounding
    assert "explanation" not in httpx.post(f"{url}/predict", content=image).json()
    assert httpx.get(f"{url}/info").json()["explain"] is True


def test_info_and_metrics_report_the_model_and_the_traffic(url, folder_run, test_images):
    info = httpx.get(f"{url}/info").json()
    assert info["classes"] == sorted(FOLDER_CLASSES)
    assert info["input_size"] == 28 and info["model"]["name"] == "resnet18"
    metrics = json.loads((folder_run / "metrics.json").read_text())
    assert info["test_metrics"]["test/acc"] == metrics["test/acc"]
    assert info["export"] is None and info["auth"] is False

    before = httpx.get(f"{url}/metrics").json()["routes"]["/predict"]["requests"]
    httpx.post(f"{url}/predict", content=test_images[0].read_bytes())
    httpx.post(f"{url}/predict", content=b"text")
    after = httpx.get(f"{url}/metrics").json()
    counts = after["routes"]["/predict"]["requests"]
    assert counts["200"] == before["200"] + 1
    assert counts["415"] == before.get("415", 0) + 1
    latency = after["routes"]["/predict"]["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"]
    assert after["pid"] == os.getpid()  # the answering process: the tests serve in theirs
    assert after["now"] == {"pending_images": 0, "pixels_in_flight": 0}
    text = httpx.get(f"{url}/metrics", params={"format": "prometheus"}).text
    pid = f'pid="{os.getpid()}"'
    assert f'thaw_requests_total{{{pid},route="/predict",status="415"}} {counts["415"]}' in text
    assert f"thaw_pixels_in_flight{{{pid}}} 0" in text


def test_an_exported_model_serves_its_parity_figures_and_predicts_answers(
    ckpt, test_images, tmp_path
):
    model = export_model(load_trained(ckpt), Path(ckpt), "onnx", tmp_path, parity_images=24)
    rows = json.loads(
        predict(
            compose_config(
                "predict",
                [f"model_path={model}", f"inputs={test_images[0]}", "out=p.json"],
                tmp_path / "predict",
            )
        ).read_text()
    )
    records = json.loads((tmp_path / "export.json").read_text())
    records["model.onnx"]["images_from"] = str(tmp_path / "photos")  # as after images=<folder>
    (tmp_path / "export.json").write_text(json.dumps(records))
    app = build_app(serve_config(tmp_path / "serve", f"model_path={model}"))
    with loopback_server(app) as base, httpx.Client(base_url=base) as client:
        info = client.get("/info").json()
        assert info["model"] == {
            "name": "resnet18",
            "format": "onnx",
            "files": [file_identity(model)],
        }
        assert str(tmp_path) not in json.dumps(info)  # an open route names no server path
        record = {**records["model.onnx"], "images_from": "photos"}
        assert info["export"] == record and info["export"]["top1_agreement"] == 1.0
        response = client.post("/predict", content=test_images[0].read_bytes())
        assert_same(response.json(), rows[0])  # the graph's score and known too
        refused = client.post("/predict", params={"explain": "true"}, content=b"x")
        assert refused.status_code == 400 and "checkpoint" in refused.json()["detail"]
        assert info["explain"] is False


def test_the_batcher_groups_waiting_requests_up_to_the_limit():
    async def scenario(max_batch_size: int, items: int) -> tuple[list[int], list[int]]:
        sizes: list[int] = []

        def double(batch: list[int]) -> list[int]:
            sizes.append(len(batch))
            return [2 * x for x in batch]

        async with DynamicBatcher(double, max_batch_size, 0.05, max_pending=64) as batcher:
            results = await asyncio.gather(*(batcher.submit(i) for i in range(items)))
        return list(results), sizes

    results, sizes = asyncio.run(scenario(4, 10))
    assert results == [2 * i for i in range(10)] and sizes == [4, 4, 2]
    results, sizes = asyncio.run(scenario(1, 5))
    assert results == [0, 2, 4, 6, 8] and sizes == [1] * 5


def test_the_batcher_waits_only_for_requests_that_are_coming():
    async def scenario(announce: bool) -> list[int]:
        sizes: list[int] = []

        def record(batch: list[int]) -> list[int]:
            sizes.append(len(batch))
            return batch

        async def second() -> int:  # read and decoded while the first waits, then submitted
            if announce:
                with batcher.coming():
                    await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(0.05)
            return await batcher.submit(2)

        async with DynamicBatcher(record, 8, timeout_s=30.0, max_pending=8) as batcher:
            late = asyncio.ensure_future(second())
            await asyncio.sleep(0)  # the second request is on its way (announced, if at all)
            first = await asyncio.wait_for(batcher.submit(1), 5)  # never the 30 s timeout
            assert [first, await late] == [1, 2]
        return sizes

    assert asyncio.run(scenario(announce=True)) == [2]
    assert asyncio.run(scenario(announce=False)) == [1, 1]


def test_a_failing_batch_fails_its_requests_and_a_full_queue_refuses_more():
    async def scenario() -> None:
        def fail_on_three(batch: list[int]) -> list[int]:
            if 3 in batch:
                raise RuntimeError("boom")
            return batch

        async with DynamicBatcher(fail_on_three, 1, 0.0, max_pending=2) as batcher:
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.submit(3)
            assert await batcher.submit(4) == 4  # the loop survived
            waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
            await asyncio.sleep(0)  # all three try to queue before the loop takes one
            done = await asyncio.gather(*waiting, return_exceptions=True)
            assert [isinstance(d, Overloaded) for d in done] == [False, False, True]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("max_batch_size=0", "max_batch_size must be an integer >= 1"),
        ("batch_timeout_ms=-1", "batch_timeout_ms must be a number >= 0"),
        ("max_upload_mb=0", "max_upload_mb must be above 0"),
        ("workers=1.5", "workers must be an integer"),
        ("tta=rotate", "tta must be one of"),
        ("api_key=''", "api_key= is refused: Hydra writes command-line overrides"),
        ("api_key_file=/nonexistent/key", "api_key_file=/nonexistent/key cannot be read"),
        ("max_image_pixels=0", "max_image_pixels must be an integer >= 1"),
        ("max_pixels_in_flight=1000", "an image at the limit could never be decoded"),
        ("decode_wait_s=-1", "decode_wait_s must be a number >= 0"),
        ("model_name='a/b'", "model_name='a/b': the Open Inference Protocol's paths take"),
    ],
)
def test_a_wrong_setting_is_named(override, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        settings_from(serve_config(tmp_path, override))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_command_line_serves_with_two_workers_and_stops_cleanly(ckpt, test_images, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "serve.py", f"ckpt_path={ckpt}", f"port={port}", "workers=2"]
    with log.open("w") as out:  # a file: a pipe nobody reads while the test waits could fill
        process = subprocess.Popen(
            [*command, f"hydra.run.dir={tmp_path}"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the workers go with it
        )
    try:
        deadline = time.monotonic() + 300  # three processes load torch: slow on a busy machine
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no /health after 300 s:\n{log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/predict"
        with ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(lambda p: httpx.post(url, content=p.read_bytes()), test_images[:8])
            )
        assert all(r.status_code == 200 for r in responses)
    finally:
        stop(process)
    output = log.read_text()
    assert process.returncode == 0, output
    assert output.count("Application startup complete") == 2, output  # one per worker


def test_a_missing_model_is_one_line_and_exit_2(tmp_path):
    answer = run_cli("serve", ["device=cpu"], tmp_path / "run")
    assert answer.returncode == 2
    assert answer.stderr.strip().splitlines()[0] == (
        "Error: give either ckpt_path=<file.ckpt> or model_path=<model.onnx>, not neither"
    )


def test_with_reject_an_image_not_known_gets_the_rules_label_as_from_predict(
    rejecting_url, doubtful, test_images, rejected
):
    files = [("files", (path.name, path.read_bytes())) for path in test_images]
    response = httpx.post(f"{rejecting_url}/predict/batch", files=files, timeout=120)
    assert response.status_code == 200, response.text
    answers = response.json()
    for path, answer in zip(test_images, answers, strict=True):
        assert_same(answer, rejected[key(path)])  # score, known and label
        top = answer["top_k"][0]["label"]
        assert answer["label"] == (top if answer["known"] else "unknown")
    assert [a["known"] for a in answers].count(False) == len(test_images) // 2
    info = httpx.get(f"{rejecting_url}/info").json()
    rule = load_trained(doubtful).postprocessing.rejection
    assert info["reject"] is True and info["rejection"] == dataclasses.asdict(rule)


def test_reject_on_a_model_without_a_rule_is_exit_2_with_predicts_advice(
    ckpt, test_images, tmp_path
):
    old = tmp_path / "old.ckpt"  # as thaw wrote checkpoints before the rejection rule
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["thaw"]["postprocessing"]["rejection"], checkpoint["thaw"][DIGEST_KEY]
    for name in [k for k in checkpoint["state_dict"] if k.startswith(REJECTION_PREFIX)]:
        del checkpoint["state_dict"][name]
    torch.save(checkpoint, old)
    args = [f"ckpt_path={old}", "reject=true", "device=cpu", f"port={free_port()}"]
    answer = run_cli("serve", args, tmp_path / "run")
    assert answer.returncode == 2, answer.stderr
    assert (
        answer.stderr.strip()
        .splitlines()[0]
        .startswith(f"Error: reject=true: {old} has no rejection rule")
    )
    assert "python fit_reject.py ckpt_path=<its checkpoint>" in answer.stderr
    with pytest.raises(UserError, match="reject=true: an ensemble has no rejection rule"):
        build_app(serve_config(tmp_path / "both", f"ckpt_path=[{ckpt},{ckpt}]", "reject=true"))

    row = predict_rows(old, test_images[0], tmp_path / "predict")[key(test_images[0])]
    with loopback_server(build_app(serve_config(tmp_path / "serve", f"ckpt_path={old}"))) as base:
        assert_same(httpx.post(f"{base}/predict", content=test_images[0].read_bytes()).json(), row)
        assert httpx.get(f"{base}/info").json()["rejection"] is None


def test_the_page_shows_one_state_at_a_time_an_answer_or_an_error(
    rejecting_url, test_images, rejected, tmp_path
):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "install them: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)

    def shown() -> set[str]:
        """The page's parts a user sees."""
        parts = ("status", "error", "result", "preview", "overlay", "bars", "verdict")
        return {part for part in parts if driver.find_element(By.ID, part).is_displayed()}

    known = [p for p in test_images if rejected[key(p)]["known"]]
    not_known = [p for p in test_images if not rejected[key(p)]["known"]]
    try:
        driver.get(rejecting_url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "resnet18" in d.find_element(By.ID, "model").text)
        assert shown() == set()  # empty: no answer, no error, no image (a broken one least)
        upload = driver.find_element(By.ID, "file")
        image = known[0]
        upload.send_keys(str(image))
        top = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .bar .label"))
        expected = row_probabilities(rejected[key(image)])
        assert top[0].text == max(expected, key=expected.get)
        assert [e.text for e in top] == sorted(expected, key=expected.get, reverse=True)
        overlay = driver.find_element(By.ID, "overlay")  # Grad-CAM of the top label
        wait.until(lambda d: overlay.is_displayed())
        assert overlay.get_attribute("src").startswith("data:image/png;base64,")
        assert shown() == {"result", "preview", "overlay", "bars"}

        notes = tmp_path / "notes.txt"
        notes.write_text("not a photo")
        upload.send_keys(str(notes))
        error = driver.find_element(By.ID, "error")
        wait.until(lambda d: error.is_displayed())
        assert "not an image" in error.text
        assert shown() == {"error"}  # the previous answer is gone with it
        assert driver.find_elements(By.CSS_SELECTOR, "#bars .bar") == []

        upload.send_keys(str(not_known[0]))  # the bars are still the nearest classes
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .bar"))
        wait.until(lambda d: "overlay" in shown())
        assert shown() == {"result", "preview", "overlay", "bars", "verdict"} and error.text == ""
        assert "not one of the known classes" in driver.find_element(By.ID, "verdict").text

        upload.send_keys(str(known[1]))  # the verdict goes with the answer it was about
        wait.until(lambda d: shown() == {"result", "preview", "overlay", "bars"})
    finally:
        driver.quit()
