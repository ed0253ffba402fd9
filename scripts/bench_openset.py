"""How well a trained model says "none of these", per rejection score, and what adding a class
costs, on real photos, offline, with seeds.

    python scripts/bench_openset.py                  # 3 seeds, 1,000 images per class
    python scripts/bench_openset.py --seeds 0 --per-class 300

For each seed, trains resnet18 from random init on five Fashion-MNIST classes (the fmnist
experiments' source classes), then fits every score on it exactly as training fits the default
one (thaw.openset.fit: training features, threshold on the validation split at keep=0.95) and
scores the five known classes' test images against:
- near-OOD: the test images of the five held-out classes (look-alikes of the known ones);
- far-OOD: images of another kind, glyphs (digits, letters, signs) drawn at random sizes,
  places and angles in the same 28 px grey format.
It prints AUROC, FPR at 95% TPR, and the accuracy on the known test images the threshold keeps,
mean ± std over seeds. Then, per seed, it adds a sixth class (--new-class) to the trained model
with model.head=extend, and trains the same six classes from the old model's own start (random
init) with twice the steps, and prints the old- and new-class test accuracy and wall time of
both. Writes <out>/openset.md and <out>/extend.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from thaw.build import build_datamodule
from thaw.config import QUIET, compose_config
from thaw.data.sources.fashion_mnist import CLASSES
from thaw.models import load_trained
from thaw.openset.extend import old_class_accuracy
from thaw.openset.fit import RejectSettings, fit_rejection
from thaw.openset.scores import auroc, fpr_at_95_tpr
from thaw.renderings import markdown_table
from thaw.train import run

KNOWN = ["T-shirt/top", "Trouser", "Pullover", "Sneaker", "Bag"]
METHODS = [("msp", 1), ("energy", 1), ("mahalanobis", 1), ("knn", 1), ("knn", 10)]
GLYPHS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt#%&@?"
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


def glyphs(count: int, seed: int) -> torch.Tensor:
    """`count` far-OOD images (N, 1, 28, 28) uint8: a glyph drawn light on black."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = Image.new("L", (28, 28), 0)
        font = ImageFont.load_default(size=int(rng.integers(14, 26)))
        where = (int(rng.integers(2, 12)), int(rng.integers(-2, 8)))
        text = GLYPHS[rng.integers(len(GLYPHS))]
        ImageDraw.Draw(image).text(where, text, fill=int(rng.integers(160, 256)), font=font)
        images.append(torch.from_numpy(np.array(image.rotate(float(rng.uniform(-20, 20))))))
    return torch.stack(images)[:, None]


def data_overrides(root: Path, classes: list[str], args: argparse.Namespace) -> list[str]:
    return [
        f"data.root={root / 'fmnist'}",
        "data.source.download=false",
        f"data.source.system_dir={SYSTEM_DIR}",
        f"data.classes=[{','.join(classes)}]",
        f"data.samples_per_class={args.per_class}",
        f"data.val_fraction={args.val_fraction}",
    ]


def training(seed: int, epochs: int) -> list[str]:
    return [
        *QUIET,
        "model.weights=null",
        f"seed={seed}",
        "trainer.max_epochs=" + str(epochs),
        "finetune=full",
        "finetune.backbone_lr_ratio=1.0",
        "scheduler=onecycle",
        "optimizer.lr=3e-3",
        "augment=none",
        "test=false",  # the bench scores best.ckpt itself
    ]


def features_of(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Features and logits of uint8 images (N, 1, H, W) through the model's preprocessing."""
    transform = model.preprocessing.transform()
    out_features, out_logits = [], []
    with torch.inference_mode():
        for start in range(0, len(images), 500):
            batch = torch.stack(
                [
                    transform(Image.fromarray(x[0].numpy()).convert("RGB"))
                    for x in images[start : start + 500]
                ]
            )
            features = model.features(batch)
            out_features.append(features)
            out_logits.append(model.head(features))
    return torch.cat(out_features), torch.cat(out_logits)


def score_rows(seed: int, root: Path, args: argparse.Namespace) -> tuple[dict, Path]:
    """Every method's figures for one seed's model, and its checkpoint; on the first
    `args.test_images` known and near test images (None: all)."""
    out = root / f"source_{seed}"
    overrides = [*training(seed, args.epochs), *data_overrides(root, KNOWN, args)]
    cfg = compose_config("train", overrides, out)
    test_images = args.test_images
    run(cfg)
    best = out / "checkpoints" / "best.ckpt"
    model = load_trained(best)
    datamodule = build_datamodule(cfg, model.preprocessing)
    datamodule.setup("fit")
    test = datamodule.test_set.subset(torch.arange(len(datamodule.test_set))[:test_images])
    all_test = datamodule.source.load().test
    near = all_test.images[
        torch.isin(
            all_test.labels,
            torch.tensor([all_test.classes.index(c) for c in CLASSES if c not in KNOWN]),
        )
    ][:test_images]
    far = glyphs(len(test), seed)
    sets = {
        name: features_of(model, images)
        for name, images in (("known", test.images), ("near", near), ("far", far))
    }
    val_batches = -(-len(datamodule.val_set) // datamodule.eval_batch_size)
    rows = {}
    temperature = model.postprocessing.temperature
    for method, k in METHODS:
        settings = RejectSettings(method, 0.95, "unknown", k, 10000, 20000)
        rule, score = fit_rejection(model, datamodule, settings, val_batches, torch.device("cpu"))
        scores = {n: score(f, logits, temperature) for n, (f, logits) in sets.items()}
        kept = rule.known(scores["known"])
        correct = sets["known"][1].argmax(1) == test.labels
        rows[f"{method}" + (f" k={k}" if method == "knn" else "")] = {
            "near AUROC": auroc(scores["known"], scores["near"]),
            "near FPR95": fpr_at_95_tpr(scores["known"], scores["near"]),
            "far AUROC": auroc(scores["known"], scores["far"]),
            "far FPR95": fpr_at_95_tpr(scores["known"], scores["far"]),
            "kept": float(kept.double().mean()),
            "acc kept": float(correct[kept].double().mean()),
            "acc all": float(correct.double().mean()),
        }
    return rows, best


def extend_rows(seed: int, root: Path, best: Path, args: argparse.Namespace) -> dict:
    """Adding `args.new_class` to the model at `best` against training the six classes from
    scratch."""
    new, epochs = args.new_class, args.epochs
    classes = [*KNOWN, new]
    data = data_overrides(root, classes, args)
    figures = {}
    for name, extra, epochs_run in (
        ("extend (model.head=extend)", [f"model.weights={best}", "model.head=extend"], epochs),
        ("all six from the old start", [], 2 * epochs),
    ):
        out = root / f"{name.split()[0]}_{seed}"
        cfg = compose_config("train", [*training(seed, epochs_run), *data, *extra], out)
        started = time.perf_counter()
        run(cfg)
        seconds = time.perf_counter() - started
        model = load_trained(out / "checkpoints" / "best.ckpt")
        datamodule = build_datamodule(cfg, model.preprocessing)
        datamodule.setup("fit")
        figures[name] = {
            "epochs": epochs_run,
            "old-class acc": old_class_accuracy(model, datamodule, KNOWN, args.test_images),
            "new-class acc": old_class_accuracy(model, datamodule, [new], args.test_images),
            "wall s": seconds,
        }
    return figures


def mean_std(values: list[float]) -> str:
    if all(float(v).is_integer() for v in values) and len(set(values)) == 1:
        return str(int(values[0]))  # the same count every seed (epochs)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(per_seed: list[dict], columns: list[str]) -> str:
    names = list(per_seed[0])
    body = [
        [name] + [mean_std([seed[name][c] for seed in per_seed]) for c in columns] for name in names
    ]
    return markdown_table([["", *columns], *body])


def main(argv: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """The figures of every seed: per method, then per way of adding the class."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--new-class", default="Sandal")
    parser.add_argument("--out", type=Path, default=Path("results/bench_openset"))
    parser.add_argument(
        "--test-images", type=int, help="score and test on only this many (default: all)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.1, help="of the training set")
    args = parser.parse_args(argv)
    scored, extended = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows, best = score_rows(seed, Path(tmp), args)
            scored.append(rows)
            extended.append(extend_rows(seed, Path(tmp), best, args))
    heading = (
        f"resnet18 from random init on {len(KNOWN)} Fashion-MNIST classes ({', '.join(KNOWN)}), "
        f"{args.per_class} images each, {args.epochs} epochs; seeds {args.seeds}; keep=0.95"
    )
    openset = f"{heading}\n\n" + table(scored, list(next(iter(scored[0].values()))))
    extend = (
        f"Adding {args.new_class} to that model, {args.per_class} images per class; seeds "
        f"{args.seeds}\n\n" + table(extended, list(next(iter(extended[0].values()))))
    )
    print(openset, "\n", extend, sep="\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openset.md").write_text(openset + "\n")
    (args.out / "extend.md").write_text(extend + "\n")
    return scored, extended


if __name__ == "__main__":
    main()
