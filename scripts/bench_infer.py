"""How fast a trained thaw classifier answers, per runtime, measured side by side on this machine.

    python scripts/bench_infer.py --ckpt logs/quickstart/<time>/transfer/checkpoints/best.ckpt

Exports the checkpoint with thaw's exporter (its parity gate included) to ONNX fp32, ONNX INT8
and a torch.export program, then measures every runtime one after the other in this process, on
the same inputs:

- eager PyTorch fp32, and the same with channels_last (NHWC) inputs and weights;
- ONNX Runtime fp32 and INT8 (static QDQ), and the torch.export program.

For each: batch-1 latency p50 and p99 (--latency-runs single images after --warmup), throughput at
batch 64 (--throughput-runs batches), the file size, and the accuracy on the run's own test images,
read through the checkpoint's preprocessing. Prints one table and the issue's targets, and writes
<out>/infer-cpu.md and .csv (the exported files go to <out>/runs/).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from thaw.build import build_datamodule
from thaw.export import export_model
from thaw.inference.export_formats import Pt2Model
from thaw.inference.onnx_model import OnnxModel
from thaw.models import ImageClassifier, load_trained
from thaw.renderings import markdown_table

Runtime = Callable[[torch.Tensor], torch.Tensor]  # a normalised float batch -> logits
THROUGHPUT_BATCH = 64


def eager(checkpoint: Path, channels_last: bool) -> Runtime:
    model = load_trained(checkpoint, channels_last=channels_last)

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        return model(batch)

    return run


def exported_program(path: Path) -> Runtime:
    model = Pt2Model(path)  # logits; the rejection score, where there is one, is not timed apart

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        return model(batch)

    return run


def weights_bytes(trained: ImageClassifier) -> int:
    """What an eager deployment ships: the model's state_dict as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def latencies_ms(runtime: Runtime, image: torch.Tensor, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        runtime(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runtime(image)
        times.append((time.perf_counter() - start) * 1000)
    return times


def throughput(runtime: Runtime, batch: torch.Tensor, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        runtime(batch)
    start = time.perf_counter()
    for _ in range(runs):
        runtime(batch)
    return runs * len(batch) / (time.perf_counter() - start)


def accuracy(runtime: Runtime, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = sum(int((runtime(images).argmax(1) == labels).sum()) for images, labels in batches)
    return correct / sum(len(labels) for _, labels in batches)


def test_batches(trained: ImageClassifier, data_root: str | None) -> list[tuple[torch.Tensor, ...]]:
    """The run's test images, preprocessed as the checkpoint says, in batches of 64."""
    cfg = OmegaConf.create(trained.config)
    if data_root:
        cfg.data.root = data_root
    cfg.data.eval_batch_size = THROUGHPUT_BATCH
    datamodule = build_datamodule(cfg, trained.preprocessing, test_only=True)
    datamodule.setup("test")
    return [(images, labels) for images, labels in datamodule.test_dataloader()]


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def measure(args: argparse.Namespace) -> list[list[str]]:
    torch.manual_seed(0)
    checkpoint = Path(args.ckpt)
    trained = load_trained(checkpoint)
    out = Path(args.out)
    models = out / "runs"  # the exported files (not committed)
    formats = ("onnx", "onnx_int8", "torch_export")
    files = {fmt: export_model(trained, checkpoint, fmt, models) for fmt in formats}
    runtimes: dict[str, tuple[Runtime, int]] = {
        "eager fp32": (eager(checkpoint, channels_last=False), weights_bytes(trained)),
        "eager channels_last": (eager(checkpoint, channels_last=True), weights_bytes(trained)),
        "ONNX Runtime fp32": (OnnxModel(files["onnx"]), files["onnx"].stat().st_size),
        "ONNX Runtime INT8": (OnnxModel(files["onnx_int8"]), files["onnx_int8"].stat().st_size),
        "torch.export": (
            exported_program(files["torch_export"]),
            files["torch_export"].stat().st_size,
        ),
    }
    batches = test_batches(trained, args.data_root)
    images = torch.cat([images for images, _ in batches])
    single = images[:1].contiguous()
    batch = images[:THROUGHPUT_BATCH].repeat(-(-THROUGHPUT_BATCH // len(images)), 1, 1, 1)
    batch = batch[:THROUGHPUT_BATCH].contiguous()
    results = {}
    for name, (runtime, size) in runtimes.items():
        times = latencies_ms(runtime, single, args.warmup, args.latency_runs)
        results[name] = {
            "p50": statistics.median(times),
            "p99": p(times, 0.99),
            "throughput": throughput(runtime, batch, args.warmup, args.throughput_runs),
            "size": size,
            "acc": accuracy(runtime, batches),
        }
    return table(results)


def table(results: dict[str, dict[str, float]]) -> list[list[str]]:
    eager_p50 = results["eager fp32"]["p50"]
    ort = results["ONNX Runtime fp32"]
    rows = [
        [
            "runtime",
            "batch-1 p50 ms",
            "batch-1 p99 ms",
            "p50 speed-up vs eager fp32",
            f"batch-{THROUGHPUT_BATCH} img/s",
            "throughput vs ORT fp32",
            "file MB",
            "size vs ORT fp32",
            "test acc",
        ]
    ]
    for name, r in results.items():
        rows.append(
            [
                name,
                f"{r['p50']:.3f}",
                f"{r['p99']:.3f}",
                f"{eager_p50 / r['p50']:.3g}",
                f"{r['throughput']:.4g}",
                f"{r['throughput'] / ort['throughput']:.3g}",
                f"{r['size'] / 2**20:.2f}",
                f"{r['size'] / ort['size']:.3g}",
                f"{r['acc']:.4f}",
            ]
        )
    return rows


def targets(results_table: list[list[str]]) -> list[list[str]]:
    """The issue's targets on a 2-core CPU, checked against this run's table."""
    rows = {row[0]: row for row in results_table[1:]}
    ort, int8 = rows["ONNX Runtime fp32"], rows["ONNX Runtime INT8"]
    acc_drop = (float(ort[8]) - float(int8[8])) * 100
    checks = [
        ("ORT fp32 batch-1 p50 speed-up vs eager", float(ort[3]), ">= 8", float(ort[3]) >= 8),
        ("ORT fp32 batch-1 p50 ms", float(ort[1]), "<= 1", float(ort[1]) <= 1),
        (
            "INT8 file size vs ORT fp32 (smaller by)",
            1 / float(int8[7]),
            ">= 3.5",
            1 / float(int8[7]) >= 3.5,
        ),
        ("INT8 throughput vs ORT fp32", float(int8[5]), ">= 1.5", float(int8[5]) >= 1.5),
        ("INT8 accuracy lost, points", acc_drop, "<= 1", acc_drop <= 1),
    ]
    return [["target", "measured", "wanted", "met"]] + [
        [name, f"{value:.3g}", wanted, "yes" if met else "NO"]
        for name, value, wanted, met in checks
    ]


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a thaw checkpoint (best.ckpt)")
    parser.add_argument("--data-root", default=None, help="where its test data is now")
    parser.add_argument("--out", default="results/bench_infer")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--latency-runs", type=int, default=500)
    parser.add_argument("--throughput-runs", type=int, default=30)
    args = parser.parse_args(argv)
    rows = measure(args)
    checked = targets(rows)
    name = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    text = f"{Path(args.ckpt)}, {name}\n\n{markdown_table(rows)}\n\n{markdown_table(checked)}\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "infer-cpu.md").write_text(text)
    with open(out / "infer-cpu.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    print(text)
    return rows


if __name__ == "__main__":
    main()
