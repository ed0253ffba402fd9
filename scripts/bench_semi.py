"""What unlabeled photos buy: FixMatch (semi=fixmatch) against supervised-only fine-tuning, on
real photos, offline, with seeds.

    python scripts/bench_semi.py                          # 10 and 40 per class, 3 seeds
    python scripts/bench_semi.py --n 10 --seeds 0 --steps 100

Pretrains resnet18 on five Fashion-MNIST classes (experiment=fmnist_source, or --source, a
checkpoint of it), then trains the quickstart's transfer split (experiment=fmnist_transfer, the
five other classes) with N labelled images per class and, for FixMatch, --unlabeled images per
class of the rest of the training set, their labels hidden. Four arms per (N, seed), each the
same optimizer steps (about --steps) and label smoothing (--label-smoothing, FixMatch's 0 by
default, so the arms differ only in the unlabeled images): supervised from the source
checkpoint, FixMatch from it, and both from scratch (random init). Prints test accuracy (mean ±
std over seeds), the fit's wall time, FixMatch's wall time over the supervised arm's, and
FixMatch's last-epoch mask rate and pseudo-label accuracy. Writes <out>/semi.csv and
<out>/semi.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

from thaw.config import QUIET, compose_config
from thaw.renderings import markdown_table
from thaw.train import run

TARGET_CLASSES = 5
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
ARMS = ("supervised", "fixmatch", "scratch", "scratch+fixmatch")


def offline(work: Path, extra: list[str]) -> list[str]:
    """Debian's Fashion-MNIST, never the network, then `extra`, which may set those keys too."""
    given = {override.split("=")[0] for override in extra}
    data = {
        "data.root": work / "fmnist",
        "data.source.download": "false",
        "data.source.system_dir": SYSTEM_DIR,
    }
    return [f"{key}={value}" for key, value in data.items() if key not in given] + extra


def arm_overrides(arm: str, unlabeled: int, mu: int, epochs: int) -> list[str]:
    """What each arm changes: the weights it starts from, and whether it uses unlabeled images.
    From the source, two_phase keeps the backbone frozen for the first quarter of the epochs."""
    scratch = ["model.weights=null", "finetune=full", "finetune.backbone_lr_ratio=1.0"]
    two_phase = [f"finetune.freeze_epochs={max(1, epochs // 4)}"]
    semi = ["semi=fixmatch", f"semi.mu={mu}", f"data.unlabeled_per_class={unlabeled}"]
    return {
        "supervised": two_phase,
        "fixmatch": [*two_phase, *semi],
        "scratch": scratch,
        "scratch+fixmatch": [*scratch, *semi],
    }[arm]


def pretrain(work: Path, extra: list[str]) -> Path:
    overrides = [*QUIET, "experiment=fmnist_source", *offline(work, extra)]
    return Path(run(compose_config("train", overrides, work / "source"))["checkpoint"])


def benchmark(args: argparse.Namespace) -> list[dict[str, object]]:
    work = Path(args.out) / "runs"
    source = Path(args.source) if args.source else pretrain(work, args.source_override)
    rows = []
    for n in args.n:
        steps_per_epoch = math.ceil(n * TARGET_CLASSES / args.batch_size)
        epochs = max(2, math.ceil(args.steps / steps_per_epoch))
        for seed in args.seeds:
            for arm in args.arms:
                overrides = [
                    *QUIET,
                    "experiment=fmnist_transfer",
                    f"source_checkpoint={source}",
                    f"data.samples_per_class={n}",
                    f"data.batch_size={args.batch_size}",
                    f"trainer.max_epochs={epochs}",
                    f"seed={seed}",
                    f"model.label_smoothing={args.label_smoothing}",
                    "calibrate=false",
                    "reject.score=null",
                    *arm_overrides(arm, args.unlabeled, args.mu, epochs),
                    *offline(work, args.transfer_override),
                ]
                cfg = compose_config("train", overrides, work / f"n{n}-{arm}-seed{seed}")
                metrics = run(cfg)
                rows.append(
                    {
                        "n_per_class": n,
                        "arm": arm,
                        "seed": seed,
                        "steps": epochs * steps_per_epoch,
                        "test_acc": metrics["test/acc"],
                        "fit_s": metrics["train/wall_time_s"],
                        "mask_rate": metrics.get("train/mask_rate_epoch", ""),
                        "pseudo_acc": metrics.get("train/pseudo_acc", ""),
                    }
                )
                print(
                    f"N={n} {arm} seed={seed}: test/acc {metrics['test/acc']:.4f} "
                    f"in {metrics['train/wall_time_s']:.0f} s",
                    flush=True,
                )
    return rows


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def mean_logged(rows: list[dict[str, object]], key: str) -> str:
    """The mean of `key` over the runs that logged it (no pseudo-label passed the threshold in a
    run's last epoch: no pseudo-label accuracy)."""
    values = [float(r[key]) for r in rows if r[key] != ""]  # type: ignore[arg-type]
    return f"{statistics.mean(values):.2f}" if values else "none kept"


def summarize(rows: list[dict[str, object]]) -> list[list[str]]:
    """One line per (N, arm): accuracy over seeds, the gain over its supervised twin, mean fit
    time and its ratio to the twin's (same N, seeds and steps)."""
    table = [
        [
            "labelled/class",
            "arm",
            "steps",
            "test acc (mean ± std)",
            "gain (points)",
            "fit s",
            "time ratio",
            "mask rate",
            "pseudo-label acc",
        ]
    ]

    def runs(n: object, arm: str) -> list[dict[str, object]]:
        return [r for r in rows if r["n_per_class"] == n and r["arm"] == arm]

    for n, arm in dict.fromkeys((r["n_per_class"], r["arm"]) for r in rows):
        mine = runs(n, str(arm))
        twin = runs(n, str(arm).replace("+fixmatch", "").replace("fixmatch", "supervised"))
        accs = [float(r["test_acc"]) for r in mine]
        fit = statistics.mean(float(r["fit_s"]) for r in mine)
        gain = ratio = mask = pseudo = ""
        if "fixmatch" in str(arm) and twin:
            twin_acc = statistics.mean(float(r["test_acc"]) for r in twin)
            gain = f"{100 * (statistics.mean(accs) - twin_acc):+.1f}"
            ratio = f"{fit / statistics.mean(float(r['fit_s']) for r in twin):.1f}x"
            mask, pseudo = mean_logged(mine, "mask_rate"), mean_logged(mine, "pseudo_acc")
        table.append(
            [
                str(n),
                str(arm),
                str(mine[0]["steps"]),
                mean_std(accs),
                gain,
                f"{fit:.0f}",
                ratio,
                mask,
                pseudo,
            ]
        )
    return table


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--unlabeled", type=int, default=2000, help="unlabeled images per class")
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="every arm's (semi=fixmatch's own is 0: smoothing caps the confidence it needs)",
    )
    parser.add_argument("--mu", type=int, default=7, help="unlabeled images per labelled one")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (about)")
    parser.add_argument("--batch-size", type=int, default=16, help="labelled images per step")
    parser.add_argument("--source", help="an fmnist_source checkpoint (default: train one)")
    parser.add_argument("--out", default="results/semi")
    parser.add_argument(
        "--source-override", nargs="*", default=[], help="extra overrides for the source run"
    )
    parser.add_argument(
        "--transfer-override", nargs="*", default=[], help="extra overrides for every other run"
    )
    args = parser.parse_args(argv)
    rows = benchmark(args)
    table = summarize(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "semi.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    caption = (
        f"Fashion-MNIST transfer split (experiment=fmnist_transfer) from an fmnist_source "
        f"checkpoint; resnet18, 28 px; {args.batch_size} labelled images a step, FixMatch with "
        f"mu {args.mu} and {args.unlabeled} unlabeled images per class; label smoothing "
        f"{args.label_smoothing:g} in every arm; about {args.steps} optimizer steps per run; "
        f"seeds {args.seeds}"
    )
    (out / "semi.md").write_text(caption + "\n\n" + markdown_table(table) + "\n")
    print(caption, markdown_table(table), sep="\n\n")
    return table


if __name__ == "__main__":
    main()
