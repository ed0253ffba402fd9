"""How fast thaw trains, measured side by side on the machine it runs on.

    python scripts/bench_speed.py                    # CPU here; the GPU where there is one
    python scripts/bench_speed.py --images 20000 --image-size 64 --out results/bench_speed

On real Fashion-MNIST (resnet18, random init: speed does not depend on the weights), each row is
measured in a child process of its own, one after the other in this run, so every ratio compares
two measurements taken under the same conditions, and each row's peak memory is its own. The
children are forked from one helper process that imports torch and thaw once and computes
nothing itself (Linux; a fresh interpreter per row cost 6 s of imports each):

- training images/s of thaw (Lightning fit with thaw's callbacks, metrics and per-group LR
  logging) vs a plain PyTorch loop doing the same work: same model, batches (prepared on the
  device beforehand), AdamW parameter groups and cosine schedule; mean step time over --repeats
  runs of each, alternating in one process;
- augmentation images/s of the device path (uint8 set on the device, whole batches augmented
  there) vs torchvision transforms on PIL images in a DataLoader with one worker per core, and vs
  thaw's own per-image path (the same transforms on uint8 tensors), batches moved to the device;
- training epoch time (validation not included) of the frozen backbone (linear probe), the same
  on cached features (plus the one-off cost of computing them), and full fine-tuning.

Prints one table and writes <out>/speed-<device>.md and .csv.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from thaw.config import QUIET, compose_config
from thaw.data.augment.batch import BatchAugment
from thaw.data.augment.per_image import build_train_transform
from thaw.data.dataset import ImageDataset
from thaw.data.resumable import DeviceLoader, ResumableLoader
from thaw.data.sources.base import ImageSet
from thaw.data.sources.fashion_mnist import FashionMNIST
from thaw.finetune import FreezeUnfreeze, Full, schedulers
from thaw.models import ImageClassifier, backbone_spec, create_backbone
from thaw.models.task import ClassificationTask
from thaw.postprocess import Postprocessing
from thaw.preprocess import Preprocessing
from thaw.renderings import markdown_table
from thaw.train import run

BASIC = {"crop_padding": 0.125, "hflip": 0.5, "color_jitter": 0.2}
LR, WEIGHT_DECAY, LABEL_SMOOTHING = 1e-3, 0.05, 0.1
# Epoch rows: (finetune overrides).
EPOCH_ROWS = {
    "epoch_frozen": ["finetune=linear_probe", "finetune.cache_features=false"],
    "epoch_cached": ["finetune=linear_probe", "finetune.cache_features=true"],
    "epoch_full": ["finetune=full"],
}


def device_of(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmnist(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The first --images training images (uint8, N x 1 x 28 x 28) and their labels."""
    train = FashionMNIST(args.data_root, download=False, system_dir=args.system_dir).load().train
    return train.images[: args.images], train.labels[: args.images]  # type: ignore[index]


# -- training throughput: thaw vs a plain loop ------------------------------------------------
def prepared_batches(args: argparse.Namespace, device: torch.device) -> list[tuple[Any, Any]]:
    images, labels = fmnist(args)
    prepare = BatchAugment(None, preprocessing(args), train=False)
    batches = []
    for start in range(0, args.steps * args.batch_size, args.batch_size):
        rows = torch.arange(start, start + args.batch_size) % len(labels)
        batches.append((prepare(images[rows].to(device)), labels[rows].to(device)))
    return batches


def preprocessing(args: argparse.Namespace) -> Preprocessing:
    """What a thaw run on these images resolves: gray, the backbone's statistics."""
    spec = backbone_spec(args.model)
    return Preprocessing(args.image_size or 28, spec.mean, spec.std, grayscale=True)


def new_classifier(args: argparse.Namespace, num_classes: int = 10) -> ClassificationTask:
    torch.manual_seed(0)
    model = ImageClassifier(
        create_backbone(args.model, weights=None),
        [str(c) for c in range(num_classes)],
        preprocessing(args),
        Postprocessing(),
        head_dropout=0.0,
        config={},
    )
    return ClassificationTask(
        model,
        optimizer=partial(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY, fused=True),
        finetune=Full(),
        scheduler=partial(schedulers.cosine, warmup_epochs=0.5),
        label_smoothing=LABEL_SMOOTHING,
        class_weights=None,
        focal_gamma=0.0,
    )


class Batches:
    """Prepared batches as one loader (Lightning would take a bare list for several)."""

    def __init__(self, batches: list[tuple[Any, Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StepTimer:
    """The wall-clock time of every step from step `warmup` on (the device synchronised at both
    ends only, so that a GPU keeps its queue full as in a real run)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.marks: list[float] = []

    def step(self, index: int) -> None:
        if index == self.warmup:
            sync(self.device)
        if index >= self.warmup:
            self.marks.append(time.perf_counter())

    def stop(self) -> list[float]:
        sync(self.device)
        self.marks.append(time.perf_counter())
        return [end - start for start, end in itertools.pairwise(self.marks)]


def images_per_s(args: argparse.Namespace, step_seconds: list[float]) -> float:
    """From the mean step, so periodic work (logging every n steps) counts too."""
    return args.batch_size / statistics.mean(step_seconds)


def thaw_steps(args: argparse.Namespace, batches: list | None = None) -> list[float]:
    import pytorch_lightning as pl

    from thaw.resume import ResumeState

    device = device_of(args)
    batches = batches or prepared_batches(args, device)
    timer = StepTimer(args.warmup, device)
    steps: list[float] = []

    class Timing(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            timer.step(batch_idx)

        def on_train_end(self, trainer, pl_module) -> None:
            steps.extend(timer.stop())

    model = new_classifier(args)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Timing(), FreezeUnfreeze(model.finetune), ResumeState()],
    )
    trainer.fit(model, train_dataloaders=Batches(batches))
    return steps


def plain_steps(args: argparse.Namespace, batches: list | None = None) -> list[float]:
    device = device_of(args)
    batches = batches or prepared_batches(args, device)
    model = new_classifier(args).to(device).train()
    groups = model.model.layer_groups()
    optimizer = torch.optim.AdamW(model.finetune.param_groups(groups, LR, WEIGHT_DECAY), fused=True)
    scheduler = schedulers.cosine(optimizer, len(batches), len(batches), warmup_epochs=0.5)
    schedule = scheduler["scheduler"]
    autocast = args.precision.startswith("bf16")
    timer = StepTimer(args.warmup, device)
    for index, (images, labels) in enumerate(batches):
        timer.step(index)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(images), labels, label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)  # after the forward, as Lightning does
        loss.backward()
        optimizer.step()
        schedule.step()
    return timer.stop()


def train_interleaved(args: argparse.Namespace) -> dict[str, float]:
    """Both loops in one process, alternating, --repeats times each: separate processes differ
    by several percent in speed alone, too much to resolve a 3% overhead."""
    batches = prepared_batches(args, device_of(args))
    thaw, plain = [], []
    for _ in range(args.repeats):
        thaw += thaw_steps(args, batches)
        plain += plain_steps(args, batches)
    return {
        "value": images_per_s(args, thaw),
        "plain": images_per_s(args, plain),
        "steps": len(thaw),
    }


# -- augmentation throughput: device batches vs PIL in a DataLoader ---------------------------
class PILImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images = [Image.fromarray(image[0].numpy(), "L") for image in images]
        self.labels, self.transform = labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def timed_epoch(loader: Any, device: torch.device) -> float:
    """Images/s of one pass, after a first pass that warms up workers and kernels."""
    for _ in loader:
        pass
    sync(device)
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images.to(device, non_blocking=True))  # where training would use them
    sync(device)
    return seen / (time.perf_counter() - start)


def augment_device(args: argparse.Namespace) -> float:
    device = device_of(args)
    images, labels = fmnist(args)
    augment = BatchAugment(BASIC, preprocessing(args), train=True)
    loader = DeviceLoader(images, labels, augment, 0, args.batch_size, device=device)
    return timed_epoch(loader, device)


def augment_pil(args: argparse.Namespace) -> float:
    images, labels = fmnist(args)
    transform = build_train_transform(BASIC, preprocessing(args))
    workers = os.cpu_count() or 1
    loader = DataLoader(
        PILImages(images, labels, transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=True,
        pin_memory=device_of(args).type == "cuda",
    )
    return timed_epoch(loader, device_of(args))


def augment_per_image(args: argparse.Namespace) -> float:
    """thaw's own data.loader=dataloader path: v2 transforms on uint8 tensors in workers."""
    images, labels = fmnist(args)
    transform = build_train_transform(BASIC, preprocessing(args))
    dataset = ImageDataset(ImageSet(images, labels, [str(c) for c in range(10)]), transform)
    workers = os.cpu_count() or 1
    loader = ResumableLoader(
        dataset, seed=0, batch_size=args.batch_size, num_workers=workers, persistent_workers=True
    )
    return timed_epoch(loader, device_of(args))


# -- epoch times: frozen, cached, full --------------------------------------------------------
def epoch_times(args: argparse.Namespace, finetune: list[str], name: str) -> dict[str, float]:
    """Seconds of the second training epoch, and of what happens between train start and the
    first epoch (computing the cached features, where they are cached)."""
    import pytorch_lightning as pl

    marks: dict[str, float] = {}
    device = device_of(args)

    class Timing(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            marks["train_start"] = time.perf_counter()
            marks["images"] = len(trainer.datamodule.train_set) + len(trainer.datamodule.val_set)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            sync(device)
            marks[f"start{trainer.current_epoch}"] = time.perf_counter()

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                sync(device)
                marks[f"end{trainer.current_epoch}"] = time.perf_counter()

    overrides = [
        *QUIET,
        f"data.root={args.data_root}",
        "data.source.download=false",
        f"data.source.system_dir={args.system_dir}",
        f"data.samples_per_class={max(1, args.images // 10)}",
        f"data.batch_size={args.batch_size}",
        "data.loader=device",
        f"data.image_size={args.image_size or 'null'}",
        "augment=none",
        f"model.name={args.model}",
        "model.weights=null",
        "trainer.max_epochs=2",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"trainer.precision={args.precision}",
        "++trainer.num_sanity_val_steps=0",
        "test=false",
        *finetune,
    ]
    cfg = compose_config("train", overrides, Path(args.out) / "runs" / name)
    run(cfg, callbacks=[Timing()])
    return {
        "value": marks["end1"] - marks["start1"],
        "setup": marks["start0"] - marks["train_start"],
        "images": marks["images"],
    }


# -- one row per child process ------------------------------------------------------------------
ROWS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "train_thaw": lambda args: images_per_s(args, thaw_steps(args)),
    "train_plain": lambda args: images_per_s(args, plain_steps(args)),
    "train_interleaved": train_interleaved,
    "augment_device": augment_device,
    "augment_pil": augment_pil,
    "augment_per_image": augment_per_image,
    **{name: partial(epoch_times, finetune=extra, name=name) for name, extra in EPOCH_ROWS.items()},
}


def peak_memory_mb(device: torch.device, rss_before: int) -> float:
    """The row's peak: CUDA memory allocated, or on CPU the process's peak resident set above
    what it held before the row started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return (peak - rss_before) / 2**20


def child(args: argparse.Namespace, row: str) -> None:
    device = device_of(args)
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    result = ROWS[row](args)
    result = result if isinstance(result, dict) else {"value": result}
    result["peak_mb"] = peak_memory_mb(device, rss_before)
    print(f"RESULT {row} " + json.dumps(result), flush=True)


def helper(args: argparse.Namespace) -> None:
    """Run each of `args.rows` in a process forked from this one, one after the other. This
    process has imported everything but run nothing, so each child starts as a fresh one would
    (no CUDA context, no thread pools), without paying for the imports again."""
    for row in args.rows.split(","):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: run the row, report, and never return into the helper
            code = 0
            try:
                child(args, row)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"row {row} failed (exit {os.waitstatus_to_exitcode(status)})")


def measure(argv: list[str], rows: list[str]) -> dict[str, dict[str, float]]:
    """Every row of `rows`, each in its own process (see `helper`): {row: its result}."""
    command = [sys.executable, __file__, *argv, "--rows", ",".join(rows)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            row, payload = line.removeprefix("RESULT ").split(" ", 1)
            results[row] = json.loads(payload)
            print(f"{row}: {results[row]}", flush=True)
    if done.returncode != 0 or set(results) != set(rows):
        raise RuntimeError(f"measuring failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return results


def ratio_row(
    name: str, fast: dict, slow: dict, unit: str, ratio: float, target: str, met: bool | None
) -> list[str]:
    return [
        name,
        f"{fast['value']:.4g} {unit}",
        f"{slow['value']:.4g} {unit}",
        f"{ratio:.3g}",
        target,
        "" if met is None else "yes" if met else "NO",
        f"{fast['peak_mb']:.0f} / {slow['peak_mb']:.0f}",
    ]


def benchmark(argv: list[str], args: argparse.Namespace) -> list[list[str]]:
    rows = ["train_interleaved", "train_thaw", "train_plain", "augment_device", "augment_pil"]
    results = measure(argv, [*rows, "augment_per_image", *EPOCH_ROWS])
    pair = results["train_interleaved"]  # throughput: medians, side by side
    thaw = {"value": pair["value"], "peak_mb": results["train_thaw"]["peak_mb"]}
    plain = {"value": pair["plain"], "peak_mb": results["train_plain"]["peak_mb"]}
    device_aug, pil_aug = results["augment_device"], results["augment_pil"]
    per_image_aug = results["augment_per_image"]
    epochs = {name: results[name] for name in EPOCH_ROWS}
    frozen, cached, full = epochs["epoch_frozen"], epochs["epoch_cached"], epochs["epoch_full"]

    overhead = plain["value"] / thaw["value"] - 1
    table = [
        [
            "measurement",
            "thaw / fast",
            "baseline",
            "ratio",
            "target",
            "met",
            "peak MB (fast / base)",
        ]
    ]
    table.append(
        ratio_row(
            f"training img/s: thaw vs plain PyTorch loop (ratio = overhead; "
            f"{pair['steps']} steps each)",
            thaw,
            plain,
            "img/s",
            overhead,
            "<= 0.03",
            overhead <= 0.03,
        )
    )
    speedup = device_aug["value"] / pil_aug["value"]
    table.append(
        ratio_row(
            "augmentation img/s: device batches vs PIL DataLoader",
            device_aug,
            pil_aug,
            "img/s",
            speedup,
            ">= 5",
            speedup >= 5,
        )
    )
    speedup = device_aug["value"] / per_image_aug["value"]
    table.append(
        ratio_row(
            "augmentation img/s: device batches vs thaw's per-image path (uint8, workers)",
            device_aug,
            per_image_aug,
            "img/s",
            speedup,
            "",
            None,
        )
    )
    for name, fast, target in (("frozen backbone", frozen, 3), ("cached features", cached, 20)):
        speedup = full["value"] / fast["value"]
        table.append(
            ratio_row(
                f"epoch s: {name} vs full fine-tuning",
                fast,
                full,
                "s",
                speedup,
                f">= {target}",
                speedup >= target,
            )
        )
    table.append(
        [
            f"one-off: computing the cached features ({cached['images']:.0f} train + val images)",
            f"{cached['setup']:.4g} s",
            f"{frozen['value']:.4g} s (a frozen epoch)",
            f"{cached['setup'] / frozen['value']:.3g}",
            "",
            "",
            "",
        ]
    )
    return table


def main(argv: list[str] | None = None) -> list[list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=4000, help="training images used")
    parser.add_argument("--image-size", type=int, default=None, help="resize to (default 28)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="training steps per throughput run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5, help="alternating throughput runs")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--data-root", default="data/fashion_mnist")
    parser.add_argument("--system-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default="results/bench_speed")
    parser.add_argument("--rows", help=argparse.SUPPRESS)  # the helper process (see `helper`)
    args = parser.parse_args(argv)
    if args.rows:
        helper(args)
        return []

    table = benchmark(argv, args)
    device = device_of(args)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{os.cpu_count()} CPU cores"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"speed-{device.type}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows(table)
    text = f"{args.model}, {args.image_size or 28} px, batch {args.batch_size}, {name}\n\n"
    text += markdown_table(table)
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    return table


if __name__ == "__main__":
    main()
