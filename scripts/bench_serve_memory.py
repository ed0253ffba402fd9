"""Peak server memory under hostile uploads, against the bound the decode budget states.

    python scripts/bench_serve_memory.py --ckpt logs/train/runs/<run>/checkpoints/best.ckpt

Starts `serve.py` (one process, the shipped limits) on a free loopback port and sends it uploads
that weigh little and decode to a lot: one-colour PNGs of 9000x9000 grey (under 100 KB, 81 MP),
a batch of them near the upload limit, many such batches at once; then RGBA PNGs just under
max_image_pixels (RGBA is the dearest mode to decode), alone, from many clients at once, and as
one batch. Before each scenario the server's peak resident memory (VmHWM) is reset to what it
holds (/proc/<pid>/clear_refs, Linux); after it, the peak is read and set against the bound:
what the server held before + BYTES_PER_PIXEL x max_pixels_in_flight + BODY_COPIES x the request
bodies in flight. Prints one table and writes <out>/serve_memory.md.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from omegaconf import OmegaConf

from thaw.renderings import markdown_table, text_table

ROOT = Path(__file__).resolve().parents[1]
# What decoding costs at most per decoded pixel (RGBA: the image, its composite on white, the
# RGB copy, the model's input tensor before it is resized), and how many copies of a request
# body the server holds at most (the body, the parsed form, each file read from it).
BYTES_PER_PIXEL = 20
BODY_COPIES = 4
MB = 1024 * 1024
# (bit depth, PNG colour type, bytes a pixel) of the modes a one-colour PNG is written in.
PNG_MODES = {"L": (8, 0, 1), "LA": (8, 4, 2), "RGB": (8, 2, 3), "RGBA": (8, 6, 4)}


def one_colour_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A PNG of one colour, compressed row by row without holding its pixels, as a client
    crafting it would: 9000x9000 grey weighs under 100 KB."""
    depth, colour_type, size = PNG_MODES[mode]
    compressor, row = zlib.compressobj(9), b"\0" + b"\x7f" * (width * size)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """serve.py in its own process, and its memory as /proc tells it."""

    def __init__(self, ckpt: Path, run_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log = run_dir / "server.log"  # a file: a pipe nobody reads could fill and block
        command = [
            sys.executable,
            str(ROOT / "serve.py"),
            f"ckpt_path={ckpt}",
            f"port={self.port}",
            "device=cpu",
            f"hydra.run.dir={run_dir}",
        ]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.settings = OmegaConf.load(ROOT / "conf" / "serve.yaml")

    def wait_until_ready(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"serve.py did not answer {self.url}/health within {seconds:g} s")

    def memory_mb(self, field: str) -> float:
        """VmRSS (held now) or VmHWM (the peak since the last reset), in MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field} in /proc/{self.process.pid}/status")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def statuses(responses: list[httpx.Response]) -> str:
    """'100x 413' for a request's answers (a batch's per file), most common first."""
    counts: Counter[int] = Counter()
    for response in responses:
        if response.status_code == 200 and isinstance(response.json(), list):
            counts.update(item.get("status", 200) for item in response.json())
        else:
            counts[response.status_code] += 1
    return ", ".join(f"{n}x {status}" for status, n in counts.most_common())


def scenarios(args: argparse.Namespace) -> list[tuple[str, Callable[[str], list], int]]:
    """(what is sent, a function sending it to a base URL, the body bytes in flight at most)."""
    bomb = one_colour_png(9000, 9000, "L")
    side = int(args.pixels**0.5)
    large = one_colour_png(side, side, "RGBA")
    bombs = [("files", (f"{i}.png", bomb)) for i in range(args.batch)]
    larges = [("files", (f"{i}.png", large)) for i in range(args.batch // 10 or 1)]

    def post(route: str = "/predict", **request) -> Callable[[str], list[httpx.Response]]:
        def send(url: str) -> list[httpx.Response]:
            return [httpx.post(f"{url}{route}", timeout=120, **request)]

        return send

    def at_once(send: Callable[[str], list[httpx.Response]]) -> Callable[[str], list]:
        def many(url: str) -> list[httpx.Response]:
            with ThreadPoolExecutor(args.clients) as pool:
                return [r for rs in pool.map(lambda _: send(url), range(args.clients)) for r in rs]

        return many

    kb = len(bomb) / 1000
    batch_mb = len(bomb) * len(bombs) / 1e6
    mp = side * side / 1e6
    return [
        (f"one 9000x9000 grey PNG ({kb:.0f} KB, 81 MP)", post(content=bomb), len(bomb)),
        (
            f"a batch of {len(bombs)} of them ({batch_mb:.1f} MB)",
            post("/predict/batch", files=bombs),
            len(bomb) * len(bombs),
        ),
        (
            f"{args.clients} clients, such a batch each, at once",
            at_once(post("/predict/batch", files=bombs)),
            args.clients * len(bomb) * len(bombs),
        ),
        (f"one {side}x{side} RGBA PNG ({mp:.0f} MP)", post(content=large), len(large)),
        (
            f"{args.clients} clients, one such PNG each, at once",
            at_once(post(content=large)),
            args.clients * len(large),
        ),
        (
            f"a batch of {len(larges)} such PNGs",
            post("/predict/batch", files=larges),
            len(large) * len(larges),
        ),
    ]


def measure(args: argparse.Namespace) -> tuple[list[list[str]], dict]:
    with tempfile.TemporaryDirectory() as run_dir:  # the server's run dir and log
        return measure_on(Server(args.ckpt, Path(run_dir)), args)


def measure_on(server: Server, args: argparse.Namespace) -> tuple[list[list[str]], dict]:
    try:
        server.wait_until_ready()
        httpx.post(f"{server.url}/predict", content=one_colour_png(64, 64))  # warm
        held = server.memory_mb("VmRSS")
        in_flight = server.settings.max_pixels_in_flight
        rows = [["sent", "answers", "peak RSS MB", "bound MB", "within", "served after"]]
        for what, send, body_bytes in scenarios(args):
            before = server.memory_mb("VmRSS")
            server.reset_peak()
            answers = statuses(send(server.url))
            peak = server.memory_mb("VmHWM")
            bound = before + (BYTES_PER_PIXEL * in_flight + BODY_COPIES * body_bytes) / MB
            served = httpx.get(f"{server.url}/health").status_code == 200
            rows.append(
                [what, answers, f"{peak:.0f}", f"{bound:.0f}", str(peak <= bound), str(served)]
            )
            print(text_table([rows[0], rows[-1]]).splitlines()[-1], flush=True)
    finally:
        server.stop()
    return rows, {"held_mb": held, "max_pixels_in_flight": in_flight}


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a thaw checkpoint (best.ckpt)")
    parser.add_argument("--out", type=Path, default=Path("results/serve_memory"))
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--batch", type=int, default=100, help="files in a batch of bombs")
    parser.add_argument(
        "--pixels", type=int, default=36_000_000, help="of the large RGBA PNGs (under the limit)"
    )
    args = parser.parse_args(argv)
    rows, facts = measure(args)
    print(text_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_memory.md").write_text(
        f"serve.py with the shipped limits, {args.ckpt.name} on the CPU; the server held "
        f"{facts['held_mb']:.0f} MB after one request. Bound: what it held before the scenario "
        f"+ {BYTES_PER_PIXEL} B x max_pixels_in_flight ({facts['max_pixels_in_flight']:,}) + "
        f"{BODY_COPIES} x the request bodies in flight.\n\n" + markdown_table(rows) + "\n"
    )
    return rows


if __name__ == "__main__":
    main()
