"""How well label_issues.py finds flipped labels, and what training on its review recovers, on
real photos, offline, with seeds.

    python scripts/bench_label_issues.py                    # 3 seeds, 1,000 images per class
    python scripts/bench_label_issues.py --seeds 0 --per-class 200 --epochs 1

For each seed: a seeded 1,000 training images of every Fashion-MNIST class (the rest of the
training split excluded with data.exclude) and 10% of their labels flipped with data.relabel,
half to a random other class and half to the class's look-alike (LOOK_ALIKE). label_issues.py
(thaw.label_issues.find_issues, --folds fold runs of the same training config) flags suspect
labels; the table gives the precision and recall of the flagged images against the flips, and
the precision at 70% recall along cleanlab's label quality ranking of the whole pool. Then
resnet18 from random init is trained four times, the same recipe, split and seed, and tested
on the official test set: on the clean labels, on the noisy ones, on the noisy ones with the
flagged images excluded (data.exclude), and with them relabelled to the suggestion
(data.relabel). "recovered" is the share of the accuracy that noise cost which a review gets
back. Writes <out>/label_issues.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from thaw.config import QUIET, compose_config
from thaw.data.sources.fashion_mnist import CLASSES, FashionMNIST
from thaw.label_issues import find_issues
from thaw.renderings import markdown_table
from thaw.review.label_issues import require_cleanlab
from thaw.train import run

SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
# Each class's look-alike: the class a hurried person files it under.
LOOK_ALIKE = {
    "T-shirt/top": "Shirt",
    "Shirt": "T-shirt/top",
    "Pullover": "Coat",
    "Coat": "Pullover",
    "Sneaker": "Sandal",
    "Sandal": "Sneaker",
    "Ankle boot": "Sneaker",
    "Dress": "Coat",
    "Trouser": "Dress",
    "Bag": "Pullover",
}
TRAININGS = ("clean", "noisy", "noisy, flagged excluded", "noisy, flagged relabelled")


def pool_and_flips(
    labels: torch.Tensor, per_class: int, noise: float, seed: int
) -> tuple[list[int], dict[int, str]]:
    """A seeded `per_class` training images of every class, and the flipped label of a seeded
    `noise` share of them: half to a random other class, half to the look-alike. NumPy's
    generator, not torch's: a torch generator of the same seed would draw exactly the images
    that thaw's seeded validation split holds out."""
    rng = np.random.default_rng(seed)
    pool = []
    for c in range(len(CLASSES)):
        idx = (labels == c).nonzero().flatten().numpy()
        pool += rng.choice(idx, per_class, replace=False).tolist()
    pool.sort()
    chosen = rng.choice(len(pool), round(noise * len(pool)), replace=False).tolist()
    flips = {}
    for n, position in enumerate(chosen):
        index = pool[position]
        given = CLASSES[int(labels[index])]
        if n % 2:
            others = [name for name in CLASSES if name != given]
            flips[index] = others[int(rng.integers(len(others)))]
        else:
            flips[index] = LOOK_ALIKE[given]
    return pool, flips


def write_list(path: Path, rows: dict[int, str | None]) -> Path:
    """A data.exclude (labels None) or data.relabel CSV naming in-memory images by index."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        labelled = any(label is not None for label in rows.values())
        writer.writerow(["index", "label"] if labelled else ["index"])
        for index, label in sorted(rows.items()):
            writer.writerow([index, label] if labelled else [index])
    return path


def training(seed: int, epochs: int, root: Path) -> list[str]:
    return [
        *QUIET,
        f"data.root={root / 'fmnist'}",
        "data.source.download=false",
        f"data.source.system_dir={SYSTEM_DIR}",
        "data.val_fraction=0.1",
        "data.batch_size=64",
        "data.eval_batch_size=500",
        "model.weights=null",
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        "trainer.accelerator=cpu",
        "finetune=full",
        "finetune.backbone_lr_ratio=1.0",
        "scheduler=onecycle",
        "optimizer.lr=3e-3",
        "augment=none",
        "reject.score=null",
    ]


def read_flagged(path: Path) -> dict[int, str]:
    """label_issues.csv: index -> suggested label, in rank order."""
    with path.open() as f:
        return {int(row["index"]): row["suggested"] for row in csv.DictReader(f)}


def precision_at_recall(run_dir: Path, flipped: set[int], recall: float) -> float:
    """Precision of the shortest prefix of the pool, ranked by cleanlab's label quality (worst
    first), that holds `recall` of the flips."""
    cleanlab = require_cleanlab()
    probabilities = np.load(run_dir / "oof_probs.npy").astype(np.float64)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    with (run_dir / "oof_images.csv").open() as f:
        rows = list(csv.DictReader(f))
    given = np.array([CLASSES.index(row["given"]) for row in rows])
    quality = cleanlab.rank.get_label_quality_scores(given, probabilities)
    hits = np.array([int(row["index"]) in flipped for row in rows])[np.argsort(quality)]
    found = np.cumsum(hits)
    k = int(np.searchsorted(found, recall * len(flipped))) + 1
    return float(found[k - 1] / k)


def seed_figures(seed: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """One seed: the review's precision and recall, and the four trainings' test accuracy."""
    source = FashionMNIST(root / "fmnist", system_dir=SYSTEM_DIR, download=False)
    labels = source.load().train.labels
    pool, flips = pool_and_flips(labels, args.per_class, args.noise, seed)
    others = sorted(set(range(len(labels))) - set(pool))
    lists = root / f"lists_{seed}"
    lists.mkdir()
    outside = write_list(lists / "outside.csv", dict.fromkeys(others))
    noisy = write_list(lists / "flips.csv", flips)
    base = [*training(seed, args.epochs, root), f"data.exclude={outside}"]

    review = root / f"review_{seed}"
    find_issues(
        compose_config(
            "label_issues", [*base, f"data.relabel={noisy}", f"folds={args.folds}"], review
        )
    )
    flagged = read_flagged(review / "label_issues.csv")
    true_flags = len(set(flagged) & set(flips))
    figures = {
        "flagged": len(flagged),
        "precision": true_flags / max(len(flagged), 1),
        "recall": true_flags / len(flips),
        "precision at 70% recall": precision_at_recall(review, set(flips), 0.7),
    }
    excluded = write_list(lists / "excluded.csv", dict.fromkeys([*others, *flagged]))
    relabelled = write_list(lists / "relabelled.csv", {**flips, **flagged})
    for name, extra in zip(
        TRAININGS,
        (
            [],
            [f"data.relabel={noisy}"],
            [f"data.relabel={noisy}", f"data.exclude={excluded}"],
            [f"data.relabel={relabelled}"],
        ),
        strict=True,
    ):
        out = root / f"{name.split(',')[-1].strip()}_{seed}"
        figures[name] = run(compose_config("train", [*base, *extra], out))["test/acc"]
    cost = figures["clean"] - figures["noisy"]
    for name in TRAININGS[2:]:
        gained = figures[name] - figures["noisy"]
        figures[f"recovered ({name.split(', ')[-1]})"] = gained / cost if cost > 0 else float("nan")
    return figures


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/label_issues"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = [seed_figures(seed, args, Path(tmp)) for seed in args.seeds]
    review = ["flagged", "precision", "recall", "precision at 70% recall"]
    accuracy = [*TRAININGS, *(k for k in per_seed[0] if k.startswith("recovered"))]
    heading = (
        f"Fashion-MNIST, {args.per_class} training images per class, {args.noise:.0%} of labels "
        f"flipped (half at random, half to the look-alike); resnet18 from random init, "
        f"{args.epochs} epochs, {args.folds} folds; seeds {args.seeds}"
    )
    text = "\n\n".join(
        [
            heading,
            "Flagged images against the flips:",
            markdown_table([review, [mean_std([s[c] for s in per_seed]) for c in review]]),
            "Test accuracy (10,000 official test images):",
            markdown_table(
                [["training", "test acc"]]
                + [[c, mean_std([s[c] for s in per_seed])] for c in accuracy]
            ),
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_issues.md").write_text(text + "\n")
    return per_seed


if __name__ == "__main__":
    main()
