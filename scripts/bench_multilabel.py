"""Multi-label on real photos, offline: BCE against the asymmetric loss, tuned thresholds against
0.5, and transfer against scratch, with seeds.

    python scripts/bench_multilabel.py                    # 5,000 training mosaics, 3 seeds
    python scripts/bench_multilabel.py --train 500 --seeds 0 --epochs 1

The data: 2x2 mosaics of Fashion-MNIST photos at 56 px (Debian's dataset-fashion-mnist), each
tile a random product or, with --empty probability, empty (at least one product per mosaic);
an image's labels are the classes in it. Training mosaics are made of the official training
photos and test mosaics of the test photos, written as PNG files with a labels.csv (data=csv,
multi-label from its `|` cells); validation is split off the training rows by iterative
stratification. Arms: resnet18 from an fmnist_source checkpoint (five of the ten classes, or
--source) with model.loss=auto (BCE) and model.loss=asl, and from scratch with BCE. Each run's
test mosaics are scored at its tuned thresholds and at 0.5: mAP (which no threshold changes),
F1 micro and macro and the exact-match ratio, mean ± std over seeds. Writes
<out>/multilabel.csv and <out>/multilabel.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from thaw.build import build_datamodule
from thaw.config import QUIET, compose_config
from thaw.data.sources.fashion_mnist import CLASSES, FashionMNIST
from thaw.evaluate import scores
from thaw.models import load_trained
from thaw.renderings import markdown_table
from thaw.train import run

SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
TILE = 28
ARMS = ("bce", "asl", "scratch")
COLUMNS = ("map", "f1_micro", "f1_macro", "exact_match")


def mosaics(
    images: torch.Tensor, labels: torch.Tensor, count: int, seed: int, empty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` 2x2 mosaics (count, 1, 56, 56) of `images` (N, 1, 28, 28) uint8, each tile a random
    image or (with probability `empty`) black, never all four black; and their multi-hot labels
    (count, classes) from `labels` (N,)."""
    rng = np.random.default_rng(seed)
    classes = int(labels.max()) + 1
    out = torch.zeros(count, 1, 2 * TILE, 2 * TILE, dtype=torch.uint8)
    sets = torch.zeros(count, classes)
    for i in range(count):
        filled = rng.random(4) >= empty
        if not filled.any():
            filled[rng.integers(4)] = True
        for tile in np.flatnonzero(filled):
            pick = int(rng.integers(len(images)))
            row, col = divmod(int(tile), 2)
            out[i, :, row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE] = images[pick]
            sets[i, labels[pick]] = 1.0
    return out, sets


def write_mosaic_csv(
    folder: Path, counts: dict[str, int], seed: int, empty: float, fmnist: str | Path = SYSTEM_DIR
) -> Path:
    """Mosaics of the official `train` and `test` photos (`counts` of each) as PNG files in
    `folder`, listed in folder/labels.csv (path, label, split). Returns the CSV's path."""
    splits = FashionMNIST(fmnist, download=False, system_dir=None).load()
    sources = {"train": splits.train, "test": splits.test}
    rows = []
    for offset, (split, count) in enumerate(counts.items()):
        photos = sources[split]
        images, sets = mosaics(photos.images, photos.labels, count, seed + offset, empty)
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i, (image, labels) in enumerate(zip(images, sets, strict=True)):
            path = Path(split) / f"{i:05d}.png"
            Image.fromarray(image[0].numpy(), "L").save(folder / path)
            names = "|".join(CLASSES[c] for c in torch.nonzero(labels).flatten().tolist())
            rows.append((str(path), names, split))
    csv_path = folder / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return csv_path


def arm_overrides(arm: str, source: Path) -> list[str]:
    if arm == "scratch":
        return ["model.weights=null", "finetune=full", "finetune.backbone_lr_ratio=1.0"]
    return [f"model.weights={source}", f"model.loss={'asl' if arm == 'asl' else 'auto'}"]


def test_outputs(cfg, checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]:
    """The test mosaics' probabilities and labels under `checkpoint`, and its thresholds."""
    model = load_trained(checkpoint).eval()
    datamodule = build_datamodule(cfg, model.preprocessing, test_only=True)
    datamodule.setup("test")
    outputs, targets = [], []
    with torch.inference_mode():
        for images, labels in datamodule.test_dataloader():
            outputs.append(model.postprocessing.probabilities(model(images).float()))
            targets.append(labels)
    return torch.cat(outputs), torch.cat(targets).long(), model.postprocessing.thresholds


def benchmark(args: argparse.Namespace) -> list[dict[str, object]]:
    work = Path(args.out) / "runs"
    fmnist = {"data.source.download": "false", "data.source.system_dir": SYSTEM_DIR}
    if args.source:
        source = Path(args.source)
    else:
        overrides = [*QUIET, "experiment=fmnist_source", f"data.root={work / 'fmnist'}"]
        overrides += [f"{k}={v}" for k, v in fmnist.items()] + args.source_override
        source = Path(run(compose_config("train", overrides, work / "source"))["checkpoint"])
    data = write_mosaic_csv(
        work / "mosaics", {"train": args.train, "test": args.test}, 0, args.empty
    )
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            overrides = [
                *QUIET,
                "data=csv",
                f"data.csv={data}",
                "data.image_size=56",
                "data.val_fraction=0.1",
                f"data.batch_size={args.batch_size}",
                "model=resnet18",
                "model.label_smoothing=0",
                "scheduler=onecycle",
                f"trainer.max_epochs={args.epochs}",
                f"seed={seed}",
                "report=false",
                *arm_overrides(arm, source),
                *args.override,
            ]
            cfg = compose_config("train", overrides, work / f"{arm}-seed{seed}")
            metrics = run(cfg)
            probabilities, labels, thresholds = test_outputs(cfg, Path(metrics["checkpoint"]))
            for at, cut in (("tuned", thresholds), ("0.5", [0.5] * len(thresholds))):
                figures = scores(probabilities, labels, thresholds=torch.tensor(cut))
                rows.append(
                    {"arm": arm, "thresholds": at, "seed": seed}
                    | {name: figures[f"test/{name}"] for name in COLUMNS}
                    | {"fit_s": metrics["train/wall_time_s"]}
                )
            print(f"{arm} seed={seed}: test/map {metrics['test/map']:.4f}", flush=True)
    return rows


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarize(rows: list[dict[str, object]]) -> list[list[str]]:
    table = [["arm", "thresholds", *COLUMNS, "fit s"]]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        for at in ("tuned", "0.5"):
            chosen = [r for r in rows if r["arm"] == arm and r["thresholds"] == at]
            figures = [mean_std([float(r[c]) for r in chosen]) for c in COLUMNS]
            fit = statistics.mean(float(r["fit_s"]) for r in chosen)
            table.append([str(arm), at, *figures, f"{fit:.0f}"])
    return table


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=5000, help="training mosaics")
    parser.add_argument("--test", type=int, default=2000, help="test mosaics")
    parser.add_argument("--empty", type=float, default=0.3, help="the chance a tile is empty")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--source", help="an fmnist_source checkpoint (default: train one)")
    parser.add_argument("--out", default="results/multilabel")
    parser.add_argument("--source-override", nargs="*", default=[])
    parser.add_argument("--override", nargs="*", default=[], help="for every mosaic run")
    args = parser.parse_args(argv)
    rows = benchmark(args)
    table = summarize(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "multilabel.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    caption = (
        f"2x2 Fashion-MNIST mosaics at 56 px ({args.train} training, {args.test} test; a tile "
        f"empty with probability {args.empty:g}), 10 labels; resnet18, {args.epochs} epochs, "
        f"batch {args.batch_size}; bce/asl from an fmnist_source checkpoint, scratch from random "
        f"init with BCE; thresholds tuned on 10% validation mosaics, or 0.5; seeds {args.seeds}"
    )
    (out / "multilabel.md").write_text(caption + "\n\n" + markdown_table(table) + "\n")
    print(caption, markdown_table(table), sep="\n\n")
    return table


if __name__ == "__main__":
    main()
