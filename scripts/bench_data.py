"""How fast image files reach the model, per data path, measured side by side in one run.

    python scripts/bench_data.py                                   # the README's table
    python scripts/bench_data.py --per-class 60 --sizes 224,64 --out results/bench_data

It writes a folder of phone-size JPEGs (real Fashion-MNIST photos from Debian's
dataset-fashion-mnist, upscaled to 750 x 1000 and saved at quality 90, as a phone shot of a
product is) and, at each training size of --sizes, measures one after the other:

- loader only: the training images/s of a whole epoch on each path, augment=basic, nothing
  trained. `per-image`: PIL decodes each JPEG (at a reduced DCT scale) in --workers loader
  workers, every epoch. `cache`: data.cache, decoded once into a memory-mapped uint8 array,
  then the batched device path. `streaming`: scripts/make_shards.py's litdata shards, streamed
  by litdata's loader with --stream-workers workers (default 0: reading a local shard is cheap,
  and on a small CPU passing batches between processes costs more than it saves), batches
  augmented on the device;
- the one-off cost: setting up the data (the cache's build; for streaming, writing the shards),
  then the first epoch and the later ones (the median of three);
- end to end: the second training epoch (validation not included) of resnet18 (random init:
  speed does not depend on the weights) with finetune=linear_probe (the frozen backbone runs
  forward on every augmented batch) and finetune=full, on each path.

Every file is checked to decode once before the first measurement (thaw's record of good files,
in <out>/runs/user_cache), so no row pays for it. The photos, caches, shards and runs are kept in
<out>/runs/ (a rerun reuses the photos). Prints one table and writes <out>/data-<device>.md and
.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from thaw.config import QUIET, compose_config
from thaw.renderings import markdown_table, text_table

PHOTO_SIZE = (750, 1000)  # width x height: a phone photo, portrait
PATHS = ("per-image", "cache", "streaming")
LATER_EPOCHS = 3
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_photos(folder: Path, per_class: int) -> Path:
    """<folder>/<class>/<i>.jpg, `per_class` photos of each Fashion-MNIST class; kept when a
    previous run wrote the same number."""
    from thaw.data.sources.fashion_mnist import FashionMNIST

    done = folder / f".written-{per_class}"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    train = FashionMNIST(FMNIST, download=False, system_dir=None).load().train
    for label, name in enumerate(train.classes):
        target = folder / name.replace("/", "_")
        target.mkdir(parents=True)
        images = train.images[train.labels == label][:per_class]
        for i, image in enumerate(images):
            photo = Image.fromarray(image[0].numpy(), "L").convert("RGB")
            photo.resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(target / f"{i}.jpg", quality=90)
    done.touch()
    return folder


def data_overrides(path: str, args: argparse.Namespace, size: int) -> list[str]:
    """The data group of one path, at training size `size`."""
    common = [
        f"data.image_size={size}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "data.val_fraction=0.1",
        "data.test_fraction=0.1",
        "augment=basic",
    ]
    if path == "streaming":
        workers = f"data.num_workers={args.stream_workers}"
        return ["data=streaming", f"data.root={shards_dir(args, size)}", *common, workers]
    folder = ["data=imagefolder", f"data.root={args.work / 'photos'}", *common]
    if path == "cache":
        return [*folder, f"data.cache={args.work / f'cache-{size}'}"]
    return [*folder, "data.loader=dataloader"]


def shards_dir(args: argparse.Namespace, size: int) -> Path:
    return args.work / f"shards-{size}"


def datamodule(overrides: list[str], out: Path) -> Any:
    from thaw.build import build_datamodule

    cfg = compose_config("train", [*overrides, "model.weights=null"], out)
    module = build_datamodule(cfg)
    module.prepare_data()
    module.setup("fit")
    return module


def prepare(path: str, args: argparse.Namespace, size: int) -> float:
    """Seconds of the one-off work before the first epoch: the DataModule's setup (for the
    cache: decoding every image into it), and for streaming writing the shards first."""
    started = time.perf_counter()
    if path == "streaming":
        sys.path.insert(0, str(Path(__file__).parent))
        import make_shards

        shutil.rmtree(shards_dir(args, size), ignore_errors=True)
        folder = data_overrides("per-image", args, size)[:3]
        make_shards.main([*folder, f"out={shards_dir(args, size)}", f"workers={args.workers}"])
    elif path == "cache":
        shutil.rmtree(args.work / f"cache-{size}", ignore_errors=True)
    datamodule(data_overrides(path, args, size), args.work / "setup")
    return time.perf_counter() - started


def loader_epochs(path: str, args: argparse.Namespace, size: int) -> tuple[float, float]:
    """Images/s of whole training epochs of the path's loader, nothing trained: the first, and
    the median of the next LATER_EPOCHS (this machine's speed wanders by tens of percent)."""
    module = datamodule(data_overrides(path, args, size), args.work / "loader")
    loader = module.train_dataloader()
    rates = []
    for epoch in range(1 + LATER_EPOCHS):
        loader.sampler.set_epoch(epoch)
        started, count = time.perf_counter(), 0
        for images, _ in loader:
            count += len(images)
        rates.append(count / (time.perf_counter() - started))
    return rates[0], statistics.median(rates[1:])


def train_epoch(path: str, args: argparse.Namespace, size: int, finetune: str) -> float:
    """Seconds of the second training epoch of resnet18 with `finetune`."""
    import pytorch_lightning as pl

    from thaw.train import run

    marks: dict[str, float] = {}

    class Timing(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            marks[f"start{trainer.current_epoch}"] = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            marks[f"end{trainer.current_epoch}"] = time.perf_counter()

    overrides = [
        *QUIET,
        *data_overrides(path, args, size),
        f"finetune={finetune}",
        "model.weights=null",
        "trainer.max_epochs=2",
        "trainer.accelerator=auto",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.limit_val_batches=1",
        "reject.score=null",
        "test=false",
    ]
    name = f"{path}-{size}-{finetune}"
    run(compose_config("train", overrides, args.work / name), callbacks=[Timing()])
    return marks["end1"] - marks["start1"]


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for size in args.sizes:
        datamodule(data_overrides("per-image", args, size), args.work / "verify")
        for path in PATHS:
            setup_s = prepare(path, args, size)
            first, later = loader_epochs(path, args, size)
            row = {"size": size, "path": path, "setup_s": setup_s, "epoch1": first, "later": later}
            for finetune in args.finetune:
                row[finetune] = train_epoch(path, args, size, finetune)
            print(row, flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], finetunes: list[str]) -> list[list[str]]:
    header = ["size", "path", "setup (s)", "epoch 1 img/s", "later img/s", "vs per-image"]
    header += [f"{name} epoch (s)" for name in finetunes]
    lines = [header]
    base = {row["size"]: row["later"] for row in rows if row["path"] == "per-image"}
    for row in rows:
        cells = [f"{row['size']} px", row["path"], f"{row['setup_s']:.1f}"]
        cells += [f"{row['epoch1']:.0f}", f"{row['later']:.0f}"]
        cells.append(f"{row['later'] / base[row['size']]:.1f}x")
        cells += [f"{row[name]:.1f}" for name in finetunes]
        lines.append(cells)
    return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=60, help="photos per class (10 classes)")
    parser.add_argument("--sizes", default="224,64", help="training sizes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--stream-workers", type=int, default=0, help="litdata's loader workers for streaming"
    )
    parser.add_argument("--finetune", default="linear_probe,full", help="'' for loaders only")
    parser.add_argument("--out", type=Path, default=Path("results/bench_data"))
    args = parser.parse_args(argv)
    args.sizes = [int(size) for size in args.sizes.split(",")]
    args.finetune = [name for name in args.finetune.split(",") if name]
    args.out = args.out.resolve()
    args.work = args.out / "runs"  # photos, caches, shards and runs: not committed
    os.environ["XDG_CACHE_HOME"] = str(args.work / "user_cache")
    write_photos(args.work / "photos", args.per_class)
    rows = measure(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = table(rows, args.finetune)
    print(text_table(lines))
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    photos = f"{args.per_class * 10} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}"
    note = (
        f"{photos} ({machine}, {args.workers} per-image loader workers, {args.stream_workers} "
        f"for streaming, batches of {args.batch_size}, "
        "augment=basic). img/s: training images per second of a whole epoch of the loader "
        "alone, the first and the median of the next three; vs per-image: later img/s against "
        "the per-image path's. Setup: the DataModule's "
        "setup, with the cache's build, or writing the shards. Epoch (s): the second training "
        "epoch of resnet18, validation not included.\n"
    )
    (args.out / f"data-{device}.md").write_text(markdown_table(lines) + "\n\n" + note)
    with open(args.out / f"data-{device}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
