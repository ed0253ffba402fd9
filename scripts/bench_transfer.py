"""What transfer learning buys on real data, offline.

Pretrains a model (resnet18, or --model, any option of the model group) from random init on five
Fashion-MNIST classes (experiment=fmnist_source), then trains on the five others with N images
per class, once per strategy and seed, and prints test accuracy (mean ± std over seeds) and wall
time per run:

    python scripts/bench_transfer.py                      # N = 10, 100, 1000; 3 seeds; pairs
    python scripts/bench_transfer.py --split halves --n 10 100 --seeds 0 1
    python scripts/bench_transfer.py --model convnext_tiny --image-size 32
    python scripts/bench_transfer.py --list-models --image-size 32   # the model group's options

ConvNeXt and ViT need 32 px or more (their stride-32 and patch-16 grids); 28 px is the data's own.

Two ways to split the ten classes (--split): `pairs`, the fmnist experiments' own, puts one of
each look-alike pair on each side, as ImageNet holds relatives of a shop's products; `halves`
takes labels 0-4 as the source and 5-9 as the target, so the source never sees footwear or bags.

Every run uses the same optimizer steps budget (about --steps), so small N trains for more
epochs; two_phase and gradual keep the head alone for the first quarter of the epochs.
Writes <out>/<split>/transfer.csv and <out>/<split>/transfer.md (<split>-<model> for --model).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

from thaw.analysis.evaluation_report import model_size
from thaw.config import QUIET, compose_config, config_dir
from thaw.data.sources.fashion_mnist import CLASSES
from thaw.models import create_backbone
from thaw.renderings import markdown_table
from thaw.train import run

DEFAULT_MODEL = "resnet18"

STRATEGIES = ("scratch", "linear_probe", "two_phase", "gradual", "full")
TARGET_CLASSES = 5


def strategy_overrides(strategy: str, epochs: int) -> list[str]:
    """How each row of the table is trained; all but scratch start from the source backbone."""
    frozen = max(1, epochs // 4)
    return {
        "scratch": ["model.weights=null", "finetune=full", "finetune.backbone_lr_ratio=1.0"],
        "linear_probe": ["finetune=linear_probe"],
        "two_phase": ["finetune=two_phase", f"finetune.freeze_epochs={frozen}"],
        "gradual": [
            "finetune=gradual",
            f"finetune.freeze_epochs={frozen}",
            f"finetune.every_epochs={max(1, (epochs - frozen) // 4)}",
        ],
        "full": ["finetune=full"],
    }[strategy]


def epochs_for(n: int, batch_size: int, steps: int) -> int:
    steps_per_epoch = math.ceil(n * TARGET_CLASSES / batch_size)
    return min(40, max(4, math.ceil(steps / steps_per_epoch)))


def classes_override(split: str, experiment: str) -> list[str]:
    """`data.classes` of `experiment`'s side of `split`; none for pairs, the experiments' own."""
    if split == "pairs":
        return []
    side = CLASSES[:TARGET_CLASSES] if experiment == "fmnist_source" else CLASSES[TARGET_CLASSES:]
    return ["data.classes=[" + ",".join(f"'{name}'" for name in side) + "]"]


def model_overrides(args: argparse.Namespace) -> list[str]:
    size = [] if args.image_size is None else [f"data.image_size={args.image_size}"]
    return [f"model={args.model}", *size]


def model_rows(models: list[str], image_size: int, work: Path) -> list[list[str]]:
    """Each model option: its family, architecture, and its backbone's parameters and FLOPs per
    image at `image_size` (random init: nothing is downloaded)."""
    table = [["model=", "family", "architecture", "parameters", f"GFLOPs at {image_size} px"]]
    for option in models:
        model = compose_config("train", [f"model={option}"], work / "models").model
        family = model.get("family", "torchvision")
        backbone = create_backbone(model.name, None, family, input_size=image_size)
        size = model_size(backbone.model.eval(), image_size)
        table.append(
            [
                option,
                family,
                model.name,
                f"{size['parameters'] / 1e6:.1f} M",
                f"{size['flops_per_image'] / 1e9:.3f}",
            ]
        )
    return table


def pretrain(work: Path, split: str, extra: list[str]) -> Path:
    overrides = [*QUIET, "experiment=fmnist_source", *classes_override(split, "fmnist_source")]
    cfg = compose_config("train", [*overrides, *extra], work / "source")
    return Path(run(cfg)["checkpoint"])  # the best checkpoint of this run, not an older one


def benchmark(args: argparse.Namespace) -> list[dict[str, object]]:
    work = out_dir(args) / "runs"
    source = pretrain(work, args.split, [*model_overrides(args), *args.source_override])
    rows = []
    for n in args.n:
        batch_size = min(args.batch_size, n * TARGET_CLASSES // 2)
        epochs = epochs_for(n, batch_size, args.steps)
        for strategy in args.strategies:
            for seed in args.seeds:
                overrides = [
                    *QUIET,
                    "experiment=fmnist_transfer",
                    *classes_override(args.split, "fmnist_transfer"),
                    f"source_checkpoint={source}",
                    f"data.samples_per_class={n}",
                    f"data.batch_size={batch_size}",
                    f"trainer.max_epochs={epochs}",
                    f"seed={seed}",
                    *strategy_overrides(strategy, epochs),
                    *model_overrides(args),
                    *args.transfer_override,
                ]
                cfg = compose_config("train", overrides, work / f"n{n}-{strategy}-seed{seed}")
                start = time.perf_counter()
                metrics = run(cfg)
                rows.append(
                    {
                        "n_per_class": n,
                        "strategy": strategy,
                        "seed": seed,
                        "epochs": epochs,
                        "test_acc": metrics["test/acc"],
                        "wall_s": time.perf_counter() - start,
                    }
                )
                print(
                    f"N={n} {strategy} seed={seed}: test/acc {metrics['test/acc']:.4f}", flush=True
                )
    return rows


def summarize(rows: list[dict[str, object]]) -> list[list[str]]:
    """One line per (N, strategy): accuracy mean ± std over seeds, mean wall time."""
    table = [["N/class", "strategy", "test acc (mean ± std)", "seeds", "wall s/run"]]
    keys = dict.fromkeys((r["n_per_class"], r["strategy"]) for r in rows)
    for n, strategy in keys:
        runs = [r for r in rows if r["n_per_class"] == n and r["strategy"] == strategy]
        accs = [float(r["test_acc"]) for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        wall = statistics.mean(float(r["wall_s"]) for r in runs)
        table.append(
            [
                str(n),
                str(strategy),
                f"{statistics.mean(accs):.4f} ± {std:.4f}",
                str(len(accs)),
                f"{wall:.1f}",
            ]
        )
    return table


def out_dir(args: argparse.Namespace) -> Path:
    name = args.split if args.model == DEFAULT_MODEL else f"{args.split}-{args.model}"
    return Path(args.out) / name


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", default="pairs", choices=["pairs", "halves"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps per run (about)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="results/bench_transfer")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="an option of the model group")
    parser.add_argument("--image-size", type=int, help="data.image_size (default: 28, native)")
    parser.add_argument(
        "--list-models",
        action="store_true",
        help="print every model option's parameters and FLOPs at --image-size, and stop",
    )
    parser.add_argument(
        "--source-override",
        nargs="*",
        default=[],
        help="extra overrides for the source run (e.g. for a quick check)",
    )
    parser.add_argument(
        "--transfer-override", nargs="*", default=[], help="extra overrides for every transfer run"
    )
    args = parser.parse_args(argv)
    if args.list_models:
        options = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
        table = model_rows(options, args.image_size or 28, Path(args.out))
        print(markdown_table(table))
        return table

    rows = benchmark(args)
    table = summarize(rows)
    out = out_dir(args)
    with open(out / "transfer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "transfer.md").write_text(markdown_table(table) + "\n")
    print(markdown_table(table))
    return table


if __name__ == "__main__":
    main()
