"""Which acquisition strategy buys the most accuracy per label: simulated active learning on real
Fashion-MNIST, offline, with seeds.

    python scripts/bench_active.py --pool 5000 --test 2000 --steps 120   # the README's table
    python scripts/bench_active.py --seeds 0 --rounds 2

Per seed: --start labelled images per class (seeded) and a pool of --pool others from the rest
of the training split, their labels hidden until acquired. Each round trains resnet18 from
random init on the labelled images alone (data.exclude drops every other training image),
scores the pool with a thaw.review.acquisition strategy on that model's probabilities and
features, and labels the --per-round best; round 0's model is shared by the strategies. No
validation split (data.val_fraction=0: every label trains), so no temperature is fitted and the
last checkpoint is the model. Test accuracy on a fixed seeded --test subset of the official test
set, mean ± std over seeds, per strategy and label count; and the fewest labels at which each
strategy's mean reaches random's accuracy at the most labels. Writes <out>/active.md and
<out>/active.csv (every run).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch

from thaw.config import QUIET, compose_config
from thaw.data.sources.base import ImageSet
from thaw.data.sources.fashion_mnist import FashionMNIST
from thaw.models import ImageClassifier, load_trained
from thaw.renderings import markdown_table
from thaw.review.acquisition import STRATEGIES, pool_outputs
from thaw.train import run

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
BATCH = 32
EVAL_BATCH = 500
GOAL = 0.7  # the share of random's labels the best strategy should need


def training(seed: int, epochs: int, root: Path, exclude: Path) -> list[str]:
    return [
        *QUIET,
        "model.weights=null",
        f"seed={seed}",
        f"data.root={root}",
        "data.source.download=false",
        f"data.source.system_dir={SYSTEM_DIR}",
        f"data.exclude={exclude}",
        "data.val_fraction=0",
        f"data.batch_size={BATCH}",
        f"data.eval_batch_size={EVAL_BATCH}",
        "data.num_workers=0",
        "augment=none",
        "finetune=full",
        "finetune.backbone_lr_ratio=1.0",
        "scheduler=onecycle",
        "optimizer.lr=3e-3",
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={epochs}",
        "callbacks.model_checkpoint=null",  # no validation to choose a best epoch by
        f"+callbacks.last_checkpoint.every_n_epochs={epochs}",  # written once, at the end
        "test=false",  # tested here, on the fixed subset
    ]


def train_on(labelled: torch.Tensor, size: int, seed: int, steps: int, out: Path) -> Path:
    """Train on the training images at `labelled` (of `size`) for about `steps` steps; the
    last checkpoint."""
    unlabelled = torch.ones(size, dtype=torch.bool)
    unlabelled[labelled] = False
    exclude = out / "unlabelled.csv"
    out.mkdir(parents=True)
    with exclude.open("w", newline="") as f:
        csv.writer(f).writerows(
            [["index"], *([i] for i in unlabelled.nonzero().flatten().tolist())]
        )
    epochs = max(1, -(-steps // -(-len(labelled) // BATCH)))
    run(compose_config("train", training(seed, epochs, out.parent / "fmnist", exclude), out))
    return out / "checkpoints" / "last.ckpt"


def outputs(model: ImageClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and features of uint8 images (N, 1, H, W), through the model's own
    preprocessing, as acquire.py computes them on files."""
    transform = model.preprocessing.transform()
    parts = [
        pool_outputs(model, transform(images[i : i + EVAL_BATCH]))
        for i in range(0, len(images), EVAL_BATCH)
    ]
    return torch.cat([p for p, _ in parts]), torch.cat([f for _, f in parts])


def accuracy(model: ImageClassifier, test: ImageSet) -> float:
    probabilities, _ = outputs(model, test.images)
    return float((probabilities.argmax(1) == test.labels).double().mean())


def seeded_start(labels: torch.Tensor, per_class: int, pool: int | None, seed: int) -> tuple:
    """`per_class` labelled images of every class and a pool of `pool` others (None: all the
    rest), as training-set positions, drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    start = torch.cat([order[labels[order] == c][:per_class] for c in labels.unique()])
    rest = order[~torch.isin(order, start)]
    return start, rest[:pool] if pool is not None else rest


def seed_runs(
    args: argparse.Namespace, seed: int, train: ImageSet, test: ImageSet, tmp: Path
) -> list[dict]:
    """Every (strategy, round) of one seed: labels used and test accuracy."""
    start, pool = seeded_start(train.labels, args.start, args.pool, seed)
    first = load_trained(train_on(start, len(train), seed, args.steps, tmp / f"s{seed}_r0"))
    first_acc = accuracy(first, test)
    rows = []
    for name in args.strategies:
        labelled, left, model, acc = start, pool, first, first_acc
        for round_ in range(args.rounds + 1):
            rows.append({"seed": seed, "strategy": name, "labels": len(labelled), "test_acc": acc})
            print(
                f"seed {seed} {name:>16} {len(labelled):>5} labels: test acc {acc:.4f}", flush=True
            )
            if round_ == args.rounds:
                break
            probabilities, features = outputs(model, train.images[left])
            budget, draw = min(args.per_round, len(left)), seed * 100 + round_
            order, _ = STRATEGIES[name](probabilities, features, budget, draw)
            chosen = torch.zeros(len(left), dtype=torch.bool)
            chosen[order] = True
            labelled, left = torch.cat([labelled, left[chosen]]), left[~chosen]
            out = tmp / f"s{seed}_{name}_r{round_ + 1}"
            model = load_trained(train_on(labelled, len(train), seed, args.steps, out))
            acc = accuracy(model, test)
    return rows


def summary(rows: list[dict], strategies: list[str]) -> tuple[list[list[str]], str]:
    """One row per strategy: mean ± std per label count, then the fewest labels whose mean
    reaches random's mean at the most labels, as a share of the most; and whether the best
    strategy met the goal (at most GOAL of the labels)."""
    counts = sorted({row["labels"] for row in rows})
    means, body = {}, []
    for name in strategies:
        cells = [name]
        for count in counts:
            accs = [r["test_acc"] for r in rows if r["strategy"] == name and r["labels"] == count]
            means[name, count] = statistics.mean(accs)
            spread = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
            cells.append(f"{means[name, count]:.4f}{spread}")
        body.append(cells)
    target, needed = means["random", counts[-1]], {}
    for name, cells in zip(strategies, body, strict=True):
        reached = [c for c in counts if means[name, c] >= target]
        needed[name] = reached[0] / counts[-1] if reached else float("inf")
        cells.append(f"{reached[0]} ({needed[name]:.0%})" if reached else "not reached")
    others = [name for name in strategies if name != "random"] or ["random"]
    best = min(others, key=lambda name: (needed[name], -means[name, counts[-1]]))
    met = "met" if needed[best] <= GOAL else "not met"
    where = f"needs {needed[best]:.0%}" if needed[best] <= 1 else "does not reach it"
    verdict = (
        f"Goal (random's accuracy at {counts[-1]} labels with at most {GOAL:.0%} of them): "
        f"{met}. The best strategy, {best}, {where}."
    )
    header = ["strategy", *map(str, counts), f"labels to reach random's {counts[-1]}"]
    return [header, *body], verdict


def main(argv: list[str] | None = None) -> list[list[str]]:
    """The summary table (header row first)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--start", type=int, default=10, help="labelled images per class")
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--pool", type=int, default=None, help="default: the rest of train")
    parser.add_argument("--test", type=int, default=None, help="default: all 10,000")
    parser.add_argument("--steps", type=int, default=120, help="training steps per round")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--out", type=Path, default=Path("results/active"))
    args = parser.parse_args(argv)
    if "random" not in args.strategies:
        args.strategies.insert(0, "random")  # the baseline the last column compares with
    splits = FashionMNIST(SYSTEM_DIR, download=False, system_dir=None).load()
    test = splits.test
    if args.test is not None:  # the same images for every seed
        test = test.subset(
            torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.test]
        )
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows += seed_runs(args, seed, splits.train, test, Path(tmp))
    minutes = (time.perf_counter() - started) / 60
    table, verdict = summary(rows, args.strategies)
    pool = f"{args.pool:,}" if args.pool is not None else "the rest of the training split"
    heading = (
        f"Test accuracy against labels used: resnet18 from random init, 28 px, no augmentation, "
        f"onecycle lr 3e-3, ~{args.steps} steps per round (batch {BATCH}), no validation split; "
        f"{args.start} labelled per class to start, +{args.per_round} per round for "
        f"{args.rounds} rounds, from a pool of {pool}; {len(test):,} Fashion-MNIST test images; "
        f"seeds {args.seeds}; {minutes:.0f} min on the CPU"
    )
    text = f"{heading}\n\n{markdown_table(table)}\n\n{verdict}"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "active.md").write_text(text + "\n")
    with (args.out / "active.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table


if __name__ == "__main__":
    main()
