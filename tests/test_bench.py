"""The benchmark scripts run end to end in a tiny setting, so they cannot rot."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from conftest import load_script, offline_fmnist
from thaw.config import compose_config
from thaw.data.sources.fashion_mnist import CLASSES
from thaw.models import create_backbone, load_trained


def test_bench_transfer_tiny(fmnist_root, tmp_path):
    bench = load_script("bench_transfer")
    data = [*offline_fmnist(fmnist_root), "data.num_workers=0", "trainer.accelerator=cpu"]
    table = bench.main(
        [
            "--n",
            "2",
            "--seeds",
            "0",
            "--steps",
            "4",
            "--out",
            str(tmp_path),
            *("--model", "timm", "--image-size", "32"),
            "--source-override",
            *data,
            "model.name=resnet10t",
            "trainer.max_epochs=1",
            "--transfer-override",
            *data,
            "model.name=resnet10t",
            "data.val_fraction=0.2",
            "data.eval_batch_size=64",
        ]
    )
    assert [row[1] for row in table[1:]] == list(bench.STRATEGIES)
    assert all(row[0] == "2" and row[3] == "1" for row in table[1:])
    runs = tmp_path / "pairs-timm" / "runs"
    source = load_trained(runs / "source/checkpoints/best.ckpt")
    assert source.config["model"]["name"] == "resnet10t"
    assert source.preprocessing.input_size == 32
    with open(tmp_path / "pairs-timm" / "transfer.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(bench.STRATEGIES)
    for row in table[1:]:  # the summary is the mean of the runs the CSV records
        accs = [float(r["test_acc"]) for r in rows if r["strategy"] == row[1]]
        assert float(row[2].split(" ± ")[0]) == pytest.approx(sum(accs) / len(accs), abs=5e-5)
    assert (tmp_path / "pairs-timm" / "transfer.md").read_text().startswith("| N/class | strat")


def test_bench_transfer_lists_models_with_their_size(tmp_path):
    bench = load_script("bench_transfer")
    rows = bench.model_rows(["resnet18", "vit_small"], 32, tmp_path)
    assert [row[:3] for row in rows[1:]] == [
        ["resnet18", "torchvision", "resnet18"],
        ["vit_small", "timm", "vit_small_patch16_224"],
    ]
    vit = create_backbone("vit_small_patch16_224", None, "timm", input_size=32).model
    assert rows[2][3] == f"{sum(p.numel() for p in vit.parameters()) / 1e6:.1f} M"
    assert 0 < float(rows[1][4]) < float(rows[2][4])  # at 32 px ViT-S costs more than resnet18


@pytest.mark.parametrize("split", ["pairs", "halves"])
def test_bench_transfer_splits_share_no_class(split, tmp_path):
    """Each split trains the target on the five classes the source never saw."""
    bench = load_script("bench_transfer")
    source = compose_config(
        "train",
        ["experiment=fmnist_source", *bench.classes_override(split, "fmnist_source")],
        tmp_path,
    ).data.classes
    target = compose_config(
        "train",
        [
            "experiment=fmnist_transfer",
            "source_checkpoint=source.ckpt",
            *bench.classes_override(split, "fmnist_transfer"),
        ],
        tmp_path,
    ).data.classes
    assert len(source) == len(target) == 5
    assert sorted([*source, *target]) == sorted(CLASSES)


def test_bench_speed_tiny(fmnist_root, tmp_path):
    bench = load_script("bench_speed")
    table = bench.main(
        [
            *("--data-root", str(fmnist_root), "--system-dir", "/nonexistent"),
            *("--device", "cpu", "--images", "40", "--batch-size", "8"),
            *("--steps", "3", "--warmup", "1", "--repeats", "1", "--out", str(tmp_path)),
        ]
    )
    assert [row[0].split(":")[0] for row in table[1:]] == [
        "training img/s",
        "augmentation img/s",
        "augmentation img/s",
        "epoch s",
        "epoch s",
        "one-off",
    ]

    def value(cell: str) -> float:
        return float(cell.split()[0])

    # Each ratio is the one its own cells give (cells round to 4 significant digits, ratios to 3).
    overhead, *speedups, one_off = table[1:]
    expected = value(overhead[2]) / value(overhead[1]) - 1  # can be < 0 on a noisy machine
    assert float(overhead[3]) == pytest.approx(expected, rel=6e-3, abs=2e-3)
    assert (overhead[5] == "yes") == (float(overhead[3]) <= 0.03)
    for row in speedups:
        fast, slow = value(row[1]), value(row[2])
        expected = fast / slow if row[0].startswith("augmentation") else slow / fast
        assert float(row[3]) == pytest.approx(expected, rel=6e-3) and float(row[3]) > 0
        assert row[5] in ("yes", "NO", "")
    assert float(one_off[3]) == pytest.approx(value(one_off[1]) / value(one_off[2]), rel=6e-3)
    assert (tmp_path / "speed-cpu.md").read_text().startswith("resnet18, 28 px, batch 8")
    with open(tmp_path / "speed-cpu.csv") as f:
        assert len(list(csv.reader(f))) == len(table)


def test_bench_infer_tiny(folder_run, tmp_path):
    bench = load_script("bench_infer")
    rows = bench.main(
        [
            *("--ckpt", str(folder_run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path)),
            *("--warmup", "1", "--latency-runs", "5", "--throughput-runs", "1"),
        ]
    )
    header, *runtimes = rows
    assert [row[0] for row in runtimes] == [
        "eager fp32",
        "eager channels_last",
        "ONNX Runtime fp32",
        "ONNX Runtime INT8",
        "torch.export",
    ]
    cells = {row[0]: dict(zip(header, row, strict=True)) for row in runtimes}
    eager, ort = cells["eager fp32"], cells["ONNX Runtime fp32"]
    # Each ratio is the one its own cells give; every exported runtime scores as the checkpoint
    # does on the run's test images (INT8 within its gate's point).
    for row in cells.values():
        speedup = float(eager["batch-1 p50 ms"]) / float(row["batch-1 p50 ms"])
        assert float(row["p50 speed-up vs eager fp32"]) == pytest.approx(speedup, rel=1e-2)
        size = float(row["file MB"]) / float(ort["file MB"])
        assert float(row["size vs ORT fp32"]) == pytest.approx(size, rel=1e-2)
    for name in ("eager channels_last", "ONNX Runtime fp32", "torch.export"):
        assert cells[name]["test acc"] == eager["test acc"]
    assert abs(float(cells["ONNX Runtime INT8"]["test acc"]) - float(eager["test acc"])) <= 0.1
    assert float(ort["file MB"]) / float(cells["ONNX Runtime INT8"]["file MB"]) > 3.5
    assert (tmp_path / "infer-cpu.md").is_file()


def test_bench_serve_tiny(folder_run, photo_folder, tmp_path):
    bench = load_script("bench_serve")
    rows = bench.main(
        [
            *("--ckpt", str(folder_run / "checkpoints" / "best.ckpt")),
            *("--images", str(photo_folder / "test"), "--out", str(tmp_path)),
            *("--requests", "16", "--seconds", "10"),
        ]
    )
    header, *runs = rows
    assert [(row[0], row[1]) for row in runs] == [
        (clients, bad) for bad in ("none", "1 in 4") for clients in ("1", "8", "32")
    ]
    for row in runs:
        cells = dict(zip(header, row, strict=True))
        ratio = float(cells["batching img/s"]) / float(cells["batch size 1 img/s"])
        assert float(cells["batching speed-up"].rstrip("x")) == pytest.approx(ratio, rel=0.05)
        assert cells["failed good"] == "0"
        refused, bad = cells["bad refused (415)"].split("/")
        assert refused == bad == ("0" if cells["bad requests"] == "none" else "8")  # 2 servers
    assert "| clients |" in (tmp_path / "serve-cpu.md").read_text()


def test_bench_stem_tiny(fmnist_root, tmp_path):
    bench = load_script("bench_stem")
    data = [*offline_fmnist(fmnist_root), "data.num_workers=0", "trainer.accelerator=cpu"]
    table = bench.main(
        [
            *("--strides", "null", "1", "--per-class", "4", "--epochs", "1"),
            *("--out", str(tmp_path), "--override", *data),
        ]
    )
    assert [row[0] for row in table[1:]] == ["null", "1"]
    with open(tmp_path / "stem.csv") as f:
        rows = list(csv.DictReader(f))
    for row, csv_row in zip(table[1:], rows, strict=True):  # each ratio is its own cells'
        ratio = float(csv_row["wall_s"]) / float(rows[0]["wall_s"])
        assert float(row[3]) == pytest.approx(ratio, abs=5e-3)
        assert float(row[1]) == pytest.approx(float(csv_row["test_acc"]), abs=5e-5)
    first_block = load_trained(tmp_path / "runs/stride-1/checkpoints/best.ckpt").backbone
    assert first_block.conv1.stride == (1, 1)  # the setting reached the run


def test_compare_runs_shows_the_metrics_the_runs_have(tmp_path):
    compare = load_script("compare_runs")
    runs = {
        "ten": {"test/acc": 0.9, "test/acc_top5": 0.99, "test/f1_macro": 0.89},
        "three": {"test/acc": 0.8, "test/f1_macro": 0.79},  # 3 classes: no top-5
    }
    for name, metrics in runs.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        config = {"model": {"weights": None}, "finetune": {"_target_": "thaw.finetune.Full"}}
        (tmp_path / name / ".hydra" / "config.yaml").write_text(json.dumps(config))
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    header, _, ten, three = compare.table([tmp_path / "ten", tmp_path / "three"]).splitlines()
    assert header.split()[3:] == ["test/acc", "test/acc_top5", "test/f1_macro"]
    assert ten.split()[3:] == ["0.9000", "0.9900", "0.8900"]
    assert three.split()[3:] == ["0.8000", "-", "0.7900"]
    only_three = compare.table([tmp_path / "three"]).splitlines()[0]
    assert "test/acc_top5" not in only_three


def test_bench_openset_tiny(tmp_path):
    bench = load_script("bench_openset")
    argv = ["--seeds", "0", "--per-class", "60", "--epochs", "2", "--out", str(tmp_path)]
    (scored,), (extended,) = bench.main([*argv, "--test-images", "300", "--val-fraction", "0.02"])
    assert list(scored) == ["msp", "energy", "mahalanobis", "knn k=1", "knn k=10"]
    for figures in scored.values():
        assert set(figures) == {"near AUROC", "near FPR95", "far AUROC", "far FPR95", "kept"} | {
            "acc kept",
            "acc all",
        }
    assert [row["epochs"] for row in extended.values()] == [2, 4]  # extending takes half
    assert (tmp_path / "openset.md").read_text().count("\n| ") == 1 + len(scored)
    assert "| extend (model.head=extend) |" in (tmp_path / "extend.md").read_text()


def test_bench_active_tiny(tmp_path):
    bench = load_script("bench_active")
    argv = ["--seeds", "0", "--rounds", "1", "--start", "1", "--per-round", "5", "--pool", "50"]
    argv += ["--test", "50", "--steps", "8", "--strategies", "kcenter", "--out", str(tmp_path)]
    table = bench.main(argv)
    assert table[0][:3] == ["strategy", "10", "15"]  # labels used: 1 per class, then +5
    assert [row[0] for row in table[1:]] == ["random", "kcenter"]  # random: the baseline
    assert table[1][-1] in ("10 (67%)", "15 (100%)")  # random reaches its own last accuracy
    with open(tmp_path / "active.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["strategy"], r["labels"]) for r in rows] == [
        ("random", "10"),
        ("random", "15"),
        ("kcenter", "10"),
        ("kcenter", "15"),
    ]
    assert rows[0]["test_acc"] == rows[2]["test_acc"]  # round 0's model is shared
    assert "Goal (random's accuracy at 15 labels" in (tmp_path / "active.md").read_text()


def test_bench_semi_tiny(fmnist_root, tmp_path):
    """Every arm runs with the steps it says, FixMatch's rows carry their gain over the
    supervised twin, and the fixmatch runs saw the unlabeled images."""
    bench = load_script("bench_semi")
    data = [*offline_fmnist(fmnist_root), "data.num_workers=0", "trainer.accelerator=cpu"]
    argv = ["--n", "2", "--seeds", "0", "--steps", "2", "--unlabeled", "3", "--batch-size", "4"]
    argv += ["--mu", "1"]
    argv += ["--out", str(tmp_path), "--source-override", *data, "trainer.max_epochs=1"]
    argv += ["--transfer-override", *data, "data.eval_batch_size=64"]
    table = bench.main(argv)
    assert [row[1] for row in table[1:]] == list(bench.ARMS)
    assert all(row[0] == "2" and row[2] == "6" for row in table[1:])  # 3 steps an epoch, 2 epochs
    supervised, fixmatch = (float(table[i][3].split(" ± ")[0]) for i in (1, 2))
    assert table[2][4] == f"{100 * (fixmatch - supervised):+.1f}" and table[1][4] == ""
    with open(tmp_path / "semi.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        metrics = json.loads(
            (tmp_path / "runs" / f"n2-{row['arm']}-seed0" / "metrics.json").read_text()
        )
        assert ("data/unlabeled" in metrics) == ("fixmatch" in row["arm"])


def test_bench_multilabel_tiny(fmnist_root, tmp_path):
    """Every arm is scored at its tuned thresholds and at 0.5, and the tuned figures are the
    ones the run's own test logged."""
    bench = load_script("bench_multilabel")
    quick = ["data.num_workers=0", "trainer.accelerator=cpu"]
    argv = ["--train", "48", "--test", "16", "--seeds", "0", "--epochs", "2", "--batch-size", "16"]
    argv += ["--out", str(tmp_path), "--override", *quick]
    argv += ["--source-override", *offline_fmnist(fmnist_root), *quick, "trainer.max_epochs=1"]
    table = bench.main(argv)
    assert [row[:2] for row in table[1:]] == [
        [arm, at] for arm in bench.ARMS for at in ("tuned", "0.5")
    ]
    with open(tmp_path / "multilabel.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["thresholds"] == "tuned":
            metrics = json.loads(
                (tmp_path / "runs" / f"{row['arm']}-seed0" / "metrics.json").read_text()
            )
            for name in bench.COLUMNS:
                assert float(row[name]) == pytest.approx(metrics[f"test/{name}"], abs=1e-5)
    assert (tmp_path / "multilabel.md").read_text().count("\n| ") == 1 + 2 * len(bench.ARMS)


def test_bench_data_tiny(tmp_path):
    """Every data path, loader and training rows, on a few phone-size JPEGs."""
    bench = load_script("bench_data")
    argv = ["--per-class", "4", "--sizes", "32", "--batch-size", "8", "--workers", "1"]
    rows = bench.main([*argv, "--finetune", "linear_probe", "--out", str(tmp_path)])
    assert [row["path"] for row in rows] == list(bench.PATHS)
    runs = tmp_path / "runs"
    assert len(list((runs / "cache-32").glob("*.npy"))) == 3  # the cache row read a cache
    assert (runs / "shards-32" / "train" / "index.json").exists()  # and streaming, shards
    assert all(
        (runs / f"{path}-32-linear_probe" / "checkpoints" / "last.ckpt").exists()
        for path in bench.PATHS
    )
    photo = next((runs / "photos").rglob("*.jpg"))
    assert Image.open(photo).size == bench.PHOTO_SIZE
    table = (tmp_path / "data-cpu.md").read_text()
    assert "| 32 px | streaming |" in table and "vs per-image" in table
    with open(tmp_path / "data-cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
