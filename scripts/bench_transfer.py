"""What transfer learning buys on real data, offline.

Pretrains resnet18 on five Fashion-MNIST classes (experiment=fmnist_source), then trains on the
five others with N images per class, once per strategy and seed, and prints test accuracy
(mean ± std over seeds) and wall time per run:

    python scripts/bench_transfer.py                      # N = 10, 100, 1000; 3 seeds; pairs
    python scripts/bench_transfer.py --split halves --n 10 100 --seeds 0 1

Two ways to split the ten classes (--split): `pairs`, the fmnist experiments' own, puts one of
each look-alike pair on each side, as ImageNet holds relatives of a shop's products; `halves`
takes labels 0-4 as the source and 5-9 as the target, so the source never sees footwear or bags.

Every run uses the same optimizer steps budget (about --steps), so small N trains for more
epochs; two_phase and gradual keep the head alone for the first quarter of the epochs.
Writes <out>/<split>/transfer.csv and <out>/<split>/transfer.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

from thaw.config import QUIET, compose_config
from thaw.data.sources.fashion_mnist import CLASSES
from thaw.report import markdown_table
from thaw.train import run

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


def pretrain(work: Path, split: str, extra: list[str]) -> Path:
    overrides = [*QUIET, "experiment=fmnist_source", *classes_override(split, "fmnist_source")]
    cfg = compose_config("train", [*overrides, *extra], work / "source")
    return Path(run(cfg)["checkpoint"])  # the best checkpoint of this run, not an older one


def benchmark(args: argparse.Namespace) -> list[dict[str, object]]:
    work = Path(args.out) / args.split / "runs"
    source = pretrain(work, args.split, args.source_override)
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


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", default="pairs", choices=["pairs", "halves"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps per run (about)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="results/bench_transfer")
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

    rows = benchmark(args)
    table = summarize(rows)
    out = Path(args.out) / args.split
    with open(out / "transfer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "transfer.md").write_text(markdown_table(table) + "\n")
    print(markdown_table(table))
    return table


if __name__ == "__main__":
    main()
