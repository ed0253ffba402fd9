"""What the stem's downsampling costs and buys on small images (model.stem_stride).

Trains the same model from random init on Fashion-MNIST (28 px, or --image-size) once per
stem_stride, with the same data, seed and steps, and prints test accuracy, wall time and the time
ratio to the architecture's own stem:

    python scripts/bench_stem.py                         # resnet18, 1,000 per class, 3 epochs
    python scripts/bench_stem.py --model mobilenet_v3_large --strides null 1

Writes <out>/stem.csv and <out>/stem.md.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from thaw.config import QUIET, compose_config
from thaw.renderings import markdown_table
from thaw.train import run


def overrides(args: argparse.Namespace, stride: str) -> list[str]:
    size = [] if args.image_size is None else [f"data.image_size={args.image_size}"]
    return [
        *QUIET,
        f"model={args.model}",
        "model.weights=null",
        f"model.stem_stride={stride}",
        "finetune=full",
        "finetune.backbone_lr_ratio=1.0",
        "scheduler=onecycle",
        "optimizer.lr=3e-3",
        f"data.samples_per_class={args.per_class}",
        f"trainer.max_epochs={args.epochs}",
        f"seed={args.seed}",
        "logger=none",
        "report=false",
        *size,
        *args.override,
    ]


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="an option of the model group")
    parser.add_argument("--strides", nargs="+", default=["null", "2", "1"])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, help="data.image_size (default: 28, native)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_stem")
    parser.add_argument("--override", nargs="*", default=[], help="extra overrides for every run")
    args = parser.parse_args(argv)

    out = Path(args.out)
    rows = []
    for stride in args.strides:
        cfg = compose_config("train", overrides(args, stride), out / "runs" / f"stride-{stride}")
        start = time.perf_counter()
        metrics = run(cfg)
        wall = time.perf_counter() - start
        rows.append({"stem_stride": stride, "test_acc": metrics["test/acc"], "wall_s": wall})
        print(f"stem_stride={stride}: test/acc {metrics['test/acc']:.4f}, {wall:.0f} s", flush=True)

    base = rows[0]["wall_s"]
    table = [
        ["model.stem_stride", "test acc", "wall s", f"time vs stem_stride={rows[0]['stem_stride']}"]
    ]
    for row in rows:
        ratio = row["wall_s"] / base
        table.append(
            [row["stem_stride"], f"{row['test_acc']:.4f}", f"{row['wall_s']:.0f}", f"{ratio:.2f}"]
        )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stem.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    setting = f"{args.per_class} images per class, {args.epochs} epochs, seed {args.seed}"
    header = f"{args.model}, {setting}\n\n"
    (out / "stem.md").write_text(header + markdown_table(table) + "\n")
    print(markdown_table(table))
    return table


if __name__ == "__main__":
    main()
