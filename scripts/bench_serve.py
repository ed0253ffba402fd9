"""How the served classifier holds up under concurrent clients, with and without dynamic batching.

    python scripts/bench_serve.py --ckpt logs/quickstart/<time>/transfer/checkpoints/best.ckpt \
        --images logs/quickstart/<time>/samples

Starts `serve.py` on two free loopback ports, with dynamic batching (max_batch_size=32) and with
max_batch_size=1, and drives one and then the other, scenario by scenario, with 1, 8 and 32
concurrent clients that post the images of --images as raw bodies until --requests requests have
been sent in all or --seconds have passed; then again with every 4th request a bad upload (text,
which must get 415 while the others are answered). Prints one table (throughput of good images,
latency p50/p99, failed good requests, the batching speed-up) and the issue's targets, and writes
<out>/serve-<device>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from thaw.inference.inputs import resolve_inputs
from thaw.renderings import markdown_table, text_table

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 8, 32)
BAD_EVERY = 4  # in a mixed run, every 4th request is a bad upload
BAD_UPLOAD = b"this is not an image"
SERVERS = {"batching": 32, "batch size 1": 1}


@dataclass
class Load:
    """What one run of concurrent clients saw."""

    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # of good requests answered 200
    failed_good: int = 0
    bad: int = 0
    bad_refused: int = 0  # bad uploads answered 415, as they should be

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[q - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    ckpt: Path, max_batch_size: int, port: int, device: str, run_dir: Path
) -> subprocess.Popen:
    """serve.py in its own process (so the clients do not share its cores' Python), started;
    `wait_until_ready` waits for it."""
    command = [
        sys.executable,
        str(ROOT / "serve.py"),
        f"ckpt_path={ckpt}",
        f"port={port}",
        f"max_batch_size={max_batch_size}",
        f"device={device}",
        f"hydra.run.dir={run_dir}",
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "server.log"  # a file, not a pipe nobody reads, which would fill and block it
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_until_ready(process: subprocess.Popen, url: str, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve.py exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"serve.py did not answer {url}/health within {seconds:g} s")


async def drive(url: str, images: list[bytes], clients: int, mixed: bool, args) -> Load:
    """`clients` concurrent clients, each posting one request at a time. aiohttp, not httpx: on
    two cores the clients share the server's CPU, and httpx's own cost per request (about twice
    aiohttp's here) made the clients, not the server, the bottleneck and the p99 tail."""
    load, sent = Load(), 0
    deadline = time.monotonic() + args.seconds
    connector = aiohttp.TCPConnector(limit=clients)

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < args.requests and time.monotonic() < deadline:
            i, sent = sent, sent + 1
            bad = mixed and i % BAD_EVERY == BAD_EVERY - 1
            start = time.perf_counter()
            body = BAD_UPLOAD if bad else images[i % len(images)]
            async with http.post(f"{url}/predict", data=body) as response:
                await response.read()
            elapsed = (time.perf_counter() - start) * 1000
            if bad:
                load.bad += 1
                load.bad_refused += response.status == 415
            elif response.status == 200:
                load.latencies_ms.append(elapsed)
            else:
                load.failed_good += 1

    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(f"{url}/predict", data=images[0]) as warmup:  # connection, model
            await warmup.read()
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        load.seconds = time.perf_counter() - start
    return load


def measure(args: argparse.Namespace) -> dict[tuple[str, int, bool], Load]:
    """Both servers up at once, each scenario run on one and then at once on the other, so a
    ratio compares runs seconds apart (this machine's speed drifts by tens of percent over
    minutes)."""
    images = [path.read_bytes() for path in resolve_inputs(args.images)]
    urls, servers = {}, []
    logs = {name: args.out / "runs" / f"bs{size}" / "server.log" for name, size in SERVERS.items()}
    try:
        for name, max_batch_size in SERVERS.items():  # both load at once
            port = free_port()
            run_dir = logs[name].parent
            servers.append(start_server(args.ckpt, max_batch_size, port, args.device, run_dir))
            urls[name] = f"http://127.0.0.1:{port}"
        for server, name in zip(servers, SERVERS, strict=True):
            wait_until_ready(server, urls[name], logs[name])
        results = {}
        for mixed in (False, True):
            for clients in CLIENTS:
                for name, url in urls.items():
                    load = asyncio.run(drive(url, images, clients, mixed, args))
                    results[name, clients, mixed] = load
                    bad = ", bad mixed in" if mixed else ""
                    print(f"{name}, {clients} clients{bad}: {load.throughput:.0f} img/s")
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=60)
    return results


def table(results: dict[tuple[str, int, bool], Load]) -> list[list[str]]:
    header = ["clients", "bad requests"]
    for name in SERVERS:
        header += [f"{name} img/s", f"{name} p50 ms", f"{name} p99 ms"]
    header += ["batching speed-up", "failed good", "bad refused (415)"]
    rows = [header]
    for mixed in (False, True):
        for clients in CLIENTS:
            loads = [results[name, clients, mixed] for name in SERVERS]
            row = [str(clients), f"1 in {BAD_EVERY}" if mixed else "none"]
            for load in loads:
                row += [
                    f"{load.throughput:.1f}",
                    f"{load.percentile(50):.1f}",
                    f"{load.percentile(99):.1f}",
                ]
            row.append(f"{loads[0].throughput / loads[1].throughput:.2f}x")
            row.append(str(sum(load.failed_good for load in loads)))
            refused, bad = (sum(getattr(x, key) for x in loads) for key in ("bad_refused", "bad"))
            row.append(f"{refused}/{bad}")
            rows.append(row)
    return rows


def targets(results: dict[tuple[str, int, bool], Load]) -> list[list[str]]:
    """The issue's targets: batching >= 2x batch size 1 at 32 clients, no failed good request,
    p99 under 500 ms at 8 clients."""
    speedup = (
        results["batching", 32, False].throughput / results["batch size 1", 32, False].throughput
    )
    failed = sum(load.failed_good for load in results.values())
    p99 = max(results["batching", 8, mixed].percentile(99) for mixed in (False, True))
    return [
        ["target", "measured", "met"],
        ["batching >= 2x batch size 1 at 32 clients", f"{speedup:.2f}x", str(speedup >= 2)],
        ["zero failed good requests", str(failed), str(failed == 0)],
        ["p99 < 500 ms at 8 clients (batching)", f"{p99:.1f} ms", str(p99 < 500)],
    ]


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a thaw checkpoint (best.ckpt)")
    parser.add_argument("--images", required=True, help="a folder of images to send")
    parser.add_argument("--out", type=Path, default=Path("results/bench_serve"))
    parser.add_argument("--requests", type=int, default=600, help="per run, at most")
    parser.add_argument("--seconds", type=float, default=15.0, help="per run, at most")
    parser.add_argument("--device", default="cpu", help="the server's: cpu or cuda")
    args = parser.parse_args(argv)
    results = measure(args)
    rows, goals = table(results), targets(results)
    cores = len(os.sched_getaffinity(0))
    print(text_table(rows))
    print(text_table(goals))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serve-{args.device}.md").write_text(
        f"{args.ckpt} served on {args.device} ({cores} CPU cores), the clients on the same "
        f"machine; at most {args.requests} requests or {args.seconds:g} s per run.\n\n"
        + markdown_table(rows)
        + "\n\n"
        + markdown_table(goals)
        + "\n"
    )
    return rows


if __name__ == "__main__":
    main()
