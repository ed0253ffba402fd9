"""The server against a hostile client and a careless operator, on real loopback ports: uploads
that decode to far more pixels than they weigh, batches larger than the queue, refused work that
must not reach the model. Bounded in time and count; no assertion on wall-clock times."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import REPO, load_script, run_cli
from serving import loopback_server, stop
from thaw.config import compose_config
from thaw.errors import UserError
from thaw.serve import build_app, check_listening
from thaw.serving.budget import BudgetExhausted, PixelBudget
from thaw.serving.keys import api_key
from thaw.serving.state import ServeState
from thaw.serving.uploads import UploadError, decode_upload, decoded_pixels

MP = 1_000_000
bench = load_script("bench_serve_memory")
one_colour_png = bench.one_colour_png


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 30, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def peak_rss_reset() -> None:
    """Start this process's peak resident memory (VmHWM) afresh from what it holds now."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.fixture(scope="module")
def ckpt(folder_run: Path) -> Path:
    return folder_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def good(photo_folder: Path) -> bytes:
    return sorted((photo_folder / "test").rglob("*.png"))[0].read_bytes()


def serving(ckpt: Path, tmp_path: Path, *overrides: str) -> Iterator[tuple[str, ServeState]]:
    app = build_app(
        compose_config("serve", ["device=cpu", f"ckpt_path={ckpt}", *overrides], tmp_path)
    )
    with loopback_server(app) as base:
        yield base, app.state.serve


@pytest.fixture(scope="module")
def default(ckpt, tmp_path_factory) -> Iterator[tuple[str, ServeState]]:
    """A server with the shipped limits."""
    yield from serving(ckpt, tmp_path_factory.mktemp("default"))


@pytest.fixture()
def tight(ckpt, tmp_path) -> Iterator[tuple[str, ServeState]]:
    """A server that decodes at most 1 MP at once, waits 0.2 s for it, and queues 4 images."""
    yield from serving(
        ckpt,
        tmp_path,
        f"max_image_pixels={MP}",
        f"max_pixels_in_flight={MP}",
        "decode_wait_s=0.2",
        "max_pending=4",
    )


# ------------------------------------------------------------------------- the decode budget
def test_the_pixels_counted_are_the_pixels_decoded_a_jpeg_at_its_draft_scale():
    photo = jpeg(4000, 3000)
    assert decoded_pixels(photo, 32, MP) == 500 * 375  # 1/8 scale still covers 32 px
    assert decode_upload(photo, 32).size == (500, 375)
    assert decoded_pixels(photo, None, 20 * MP) == 4000 * 3000
    with pytest.raises(UploadError) as refused:
        decoded_pixels(one_colour_png(4000, 3000), 32, MP)
    assert refused.value.status == 413
    assert "4000x3000 = 12,000,000 pixels" in str(refused.value)
    assert "1,000,000 (max_image_pixels)" in str(refused.value)


def test_an_image_over_the_pixel_limit_gets_413_naming_its_size_and_the_limit(tight, good):
    url, _ = tight
    with httpx.Client(base_url=url) as client:
        response = client.post("/predict", content=one_colour_png(2000, 1000))
        assert response.status_code == 413
        assert "2000x1000" in response.json()["detail"]
        assert "max_image_pixels" in response.json()["detail"]
        # 12 MP as a JPEG decodes at 1/8 scale: 0.19 MP, under the limit.
        assert client.post("/predict", content=jpeg(4000, 3000)).status_code == 200
        batch = client.post(
            "/predict/batch",
            files=[("files", ("big.png", one_colour_png(2000, 1000))), ("files", ("ok.png", good))],
        ).json()
        assert batch[0]["status"] == 413 and "label" in batch[1]


def test_a_79_kb_png_declaring_9000x9000_is_refused_before_any_pixel_is_decoded(default, good):
    url, _ = default
    bomb = one_colour_png(9000, 9000, "L")  # 81 MB of grey decoded, 243 MB as RGB
    assert len(bomb) < 100_000
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/predict", content=good).status_code == 200  # warm
        peak_rss_reset()
        before = peak_rss_mb()
        answers = [client.post("/predict", content=bomb) for _ in range(3)]
        assert peak_rss_mb() - before < 100
    assert [a.status_code for a in answers] == [413] * 3
    assert "9000x9000 = 81,000,000 pixels" in answers[0].json()["detail"]


def test_a_decode_waits_for_the_budget_then_gets_503_with_retry_after(tight, good):
    url, state = tight
    state.budget.in_flight = state.budget.capacity  # as if other uploads were decoding
    try:
        refused = httpx.post(f"{url}/predict", content=good)
    finally:
        state.budget.in_flight = 0
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "max_pixels_in_flight" in refused.json()["detail"]
    assert httpx.post(f"{url}/predict", content=good).status_code == 200


def test_the_budget_lets_waiters_in_first_come_first_and_a_cancelled_one_leaves():
    async def scenario() -> list[str]:
        budget, order = PixelBudget(10, wait_s=30), []

        async def use(name: str, pixels: int, release: asyncio.Event) -> None:
            async with budget.hold(pixels):
                order.append(name)
                await release.wait()

        first, rest = asyncio.Event(), asyncio.Event()
        holder = asyncio.ensure_future(use("8 px", 8, first))
        await asyncio.sleep(0)
        big = asyncio.ensure_future(use("5 px", 5, rest))
        gone = asyncio.ensure_future(use("cancelled", 1, rest))
        small = asyncio.ensure_future(use("1 px", 1, rest))  # fits now, but queues behind 5 px
        await asyncio.sleep(0)
        assert order == ["8 px"] and budget.in_flight == 8
        gone.cancel()
        await asyncio.sleep(0)
        first.set()
        rest.set()
        await asyncio.gather(holder, big, small)
        assert budget.in_flight == 0

        brief = PixelBudget(10, wait_s=0.05)
        async with brief.hold(10):
            with pytest.raises(BudgetExhausted, match="max_pixels_in_flight"):
                async with brief.hold(1):
                    pass
            assert brief.in_flight == 10
        assert brief.in_flight == 0
        return order

    assert asyncio.run(scenario()) == ["8 px", "5 px", "1 px"]


# ------------------------------------------------------------------- refused batches and work
def test_a_batch_larger_than_the_queue_gets_413_and_reaches_no_model(tight, good):
    url, state = tight
    before = sum(size * n for size, n in state.batcher.batch_sizes.items())
    files = [("files", (f"{i}.png", good)) for i in range(5)]
    response = httpx.post(f"{url}/predict/batch", files=files)
    assert response.status_code == 413
    assert "5 files, more than the 4 the server queues at once (max_pending)" in response.text
    assert sum(size * n for size, n in state.batcher.batch_sizes.items()) == before
    assert httpx.post(f"{url}/predict/batch", files=files[:4]).status_code == 200


def test_a_batch_refused_as_busy_has_its_queued_images_dropped_before_the_model(tight, good):
    url, state = tight
    batcher, classify = state.batcher, state.batcher.run_batch
    entered, gate, seen = threading.Event(), threading.Event(), []

    def gated(items: list) -> list:
        entered.set()
        assert gate.wait(60)
        seen.append(len(items))
        return classify(items)

    batcher.run_batch = gated
    files = [("files", (f"{i}.png", good)) for i in range(3)]
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        alone = pool.submit(client.post, "/predict", content=good)
        assert entered.wait(60)  # the model is busy with it; the queue (4) is empty
        queued = pool.submit(client.post, "/predict/batch", files=files)
        for _ in range(6000):
            if batcher.waiting == 3:
                break
            threading.Event().wait(0.01)
        assert batcher.waiting == 3
        refused = client.post("/predict/batch", files=files[:2])  # one fits, one does not
        gate.set()
        assert alone.result().status_code == 200 and queued.result().status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert sum(seen) == 4  # the lone image and the first batch: the refused one's never ran


def test_the_memory_benchmark_stays_under_its_bound_and_the_server_goes_on(ckpt, tmp_path):
    rows = bench.main(
        ["--ckpt", str(ckpt), "--out", str(tmp_path), "--clients", "3", "--batch", "10"]
        + ["--pixels", "4000000"]
    )
    header, *scenarios = rows
    assert len(scenarios) == 6
    for row in scenarios:
        assert row[header.index("within")] == "True", row
        assert row[header.index("served after")] == "True", row
    assert rows[2][1] == "10x 413"  # a batch of bombs: each file refused on its own
    assert "| sent |" in (tmp_path / "serve_memory.md").read_text()


# ------------------------------------------------------------------------- operator mistakes
@pytest.mark.parametrize(
    ("port", "words"),
    [
        (99999, "port must be an integer in [1, 65535], got 99999"),
        (-1, "got -1"),
        ("abc", "got 'abc'"),
    ],
)
def test_a_port_that_is_no_tcp_port_is_named_with_the_fix(port, words):
    with pytest.raises(UserError) as refused:
        check_listening("127.0.0.1", port)
    assert words in str(refused.value) and "e.g. port=8000" in str(refused.value)


def test_a_bad_port_or_one_in_use_is_exit_2_before_the_model_loads(tmp_path):
    answer = run_cli("serve", ["ckpt_path=missing.ckpt", "port=99999"], tmp_path / "a")
    assert answer.returncode == 2, answer.stderr
    assert answer.stderr.strip().splitlines()[0] == (
        "Error: port must be an integer in [1, 65535], got 99999: give the TCP port to listen "
        "on, e.g. port=8000"
    )
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        answer = run_cli("serve", ["ckpt_path=missing.ckpt", f"port={port}"], tmp_path / "b")
    assert answer.returncode == 2, answer.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in answer.stderr
    assert "Traceback" not in answer.stderr


# ----------------------------------------------------------------------------- the API key
def start_serve(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> tuple:
    """serve.py on a free port in its own session (its workers go with it), logging to a file;
    (the process, its base URL, the log)."""
    port, log = free_port(), run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as out:  # a file: a pipe nobody reads while the test waits could fill
        process = subprocess.Popen(
            [sys.executable, "serve.py", f"port={port}", *args, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(1500):  # 300 s: several processes load torch on a busy machine
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url, log
        except httpx.TransportError:
            time.sleep(0.2)
    stop(process)
    raise AssertionError(f"no /health after 300 s:\n{log.read_text()}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_key_from_the_environment_guards_the_server_and_never_reaches_the_run_dir(
    ckpt, good, tmp_path
):
    secret = secrets.token_hex(16)
    run_dir = tmp_path / "run"
    process, url, log = start_serve(run_dir, f"ckpt_path={ckpt}", env={"THAW_API_KEY": secret})
    try:
        with httpx.Client(base_url=url) as client:
            assert client.post("/predict", content=good).status_code == 401
            auth = {"Authorization": f"Bearer {secret}"}
            assert client.post("/predict", content=good, headers=auth).status_code == 200
    finally:
        stop(process)
    written = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(path.parent.name == ".hydra" for path in written)  # what Hydra writes is there
    for path in [*written, log]:
        assert secret.encode() not in path.read_bytes(), path


def test_the_key_is_read_from_a_file_and_a_bad_one_is_named(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("  k3y-from-a-file\n")
    cfg = compose_config("serve", [f"api_key_file={key_file}"], tmp_path / "a")
    assert api_key(cfg) == "k3y-from-a-file"
    key_file.write_text("\n")
    with pytest.raises(UserError, match=f"api_key_file={key_file} holds an empty API key"):
        api_key(cfg)
    key_file.write_text("two words")
    with pytest.raises(UserError, match="whitespace or control characters"):
        api_key(cfg)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("THAW_API_KEY", "other")
        with pytest.raises(UserError, match="both THAW_API_KEY and api_key_file"):
            api_key(cfg)
        env.setenv("THAW_API_KEY", " ")
        with pytest.raises(UserError, match="THAW_API_KEY holds an empty API key"):
            api_key(compose_config("serve", [], tmp_path / "b"))


@pytest.mark.parametrize("case", ["literal key", "missing file", "empty file"])
def test_a_key_on_the_command_line_or_a_bad_key_file_is_exit_2_and_nothing_on_disk(case, tmp_path):
    secret, run_dir = secrets.token_hex(16), tmp_path / "run"
    key_file = tmp_path / "key"
    if case == "empty file":
        key_file.write_text("")
    override = f"api_key={secret}" if case == "literal key" else f"api_key_file={key_file}"
    answer = run_cli("serve", ["ckpt_path=missing.ckpt", override], run_dir)
    assert answer.returncode == 2, answer.stderr
    first = answer.stderr.strip().splitlines()[0]
    assert first.startswith("Error: ") and "THAW_API_KEY" in first
    assert secret not in answer.stderr + answer.stdout
    if case == "literal key":
        assert "api_key_file=<path>" in first
        assert not run_dir.exists()  # refused before Hydra wrote anything
    else:
        assert f"api_key_file={key_file}" in first


# ---------------------------------------------------------------------------------- workers
def children(parent: int) -> list[int]:
    """The pids whose parent is `parent`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # it ended while being read
            continue
        if ppid == parent:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Whether `pid` runs: a zombie has ended, only its entry waits to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killing_the_parent_of_two_workers_leaves_none_serving(ckpt, tmp_path):
    process, url, log = start_serve(tmp_path / "run", f"ckpt_path={ckpt}", "workers=2")
    try:
        for _ in range(1500):  # both workers up: the first answers /health before the second
            if log.read_text().count("Application startup complete") == 2:
                break
            time.sleep(0.2)
        workers = {
            int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", log.read_text())
        }
        spawned = children(process.pid)  # the workers, and multiprocessing's resource tracker
        assert len(workers) == 2 and workers <= set(spawned), log.read_text()
        answering = {httpx.get(f"{url}/metrics").json()["pid"] for _ in range(10)}
        assert answering <= workers  # each answer names its worker
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        for _ in range(300):  # 60 s at most
            if not any(running(pid) for pid in spawned):
                break
            time.sleep(0.2)
        assert not any(running(pid) for pid in spawned), log.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- slow clients
def read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (a 60 s stall fails the test)."""
    sock.settimeout(60)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_heads_and_bodies_are_cut_off_and_the_others_are_answered(ckpt, good, tmp_path):
    timeouts = ("header_timeout_s=1", "body_timeout_s=2")
    process, url, _ = start_serve(tmp_path / "run", f"ckpt_path={ckpt}", *timeouts)
    address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
    try:
        with (
            socket.create_connection(address) as half_head,
            socket.create_connection(address) as second_head,
            socket.create_connection(address) as slow_body,
        ):
            half_head.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le")
            second_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /hea")
            head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
            slow_body.sendall(head + good[:10])
            with httpx.Client(base_url=url) as client:  # the others go on meanwhile
                assert client.post("/predict", content=good).status_code == 200
                assert client.get("/health").status_code == 200
            assert read_until_closed(half_head) == b""  # closed, nothing answered
            answered = read_until_closed(second_head)  # the first request, not the stalled one
            assert answered.startswith(b"HTTP/1.1 200") and answered.count(b"HTTP/1.1") == 1
            late = read_until_closed(slow_body)
            assert late.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in late
        assert httpx.post(f"{url}/predict", content=good).status_code == 200
    finally:
        stop(process)
