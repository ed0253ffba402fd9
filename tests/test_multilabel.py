"""Multi-label end to end, on mosaics of real photos (scripts/bench_multilabel.py's): label sets
from a CSV, iterative stratification, per-label thresholds tuned on validation and carried into
the checkpoint, the ONNX file and the server, the metrics and the report; and the single-label
paths the multi-label code touches, unchanged."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
import torch
from torch.nn import functional as F
from torchvision.transforms import v2

from conftest import REAL_FMNIST, TINY, load_script
from serving import loopback_server
from thaw.analysis.thresholds import best_f1_threshold, tune_thresholds
from thaw.config import compose_config
from thaw.data.augment.mixing import BatchMix
from thaw.data.augment.options import AugmentOptions
from thaw.data.sources.csv import CsvSource
from thaw.data.splits import stratified_folds, stratified_split
from thaw.errors import UserError
from thaw.evaluate import evaluate, scores
from thaw.export import export_model
from thaw.inference.onnx_model import OnnxModel
from thaw.inference.predictor import Predictor
from thaw.models import load_trained
from thaw.models.loss import MultiLabelLoss, training_loss
from thaw.predict import predict
from thaw.serve import build_app
from thaw.train import run

CLASSES = 10


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """labels.csv of 2x2 Fashion-MNIST mosaics: 240 training and 48 test images, 56 px."""
    assert REAL_FMNIST.is_dir(), "install the data: apt-get install dataset-fashion-mnist"
    bench = load_script("bench_multilabel")
    folder = tmp_path_factory.mktemp("mosaics")
    return bench.write_mosaic_csv(folder, {"train": 240, "test": 48}, seed=0, empty=0.3)


@pytest.fixture(scope="module")
def multilabel_run(mosaics: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run dir of a tiny model trained on the mosaics, with its report."""
    run_dir = tmp_path_factory.mktemp("multilabel") / "run"
    overrides = [
        *TINY,
        "data=csv",
        f"data.csv={mosaics}",
        "data.image_size=56",
        "data.val_fraction=0.2",
        "data.batch_size=32",
        "finetune=full",
        "finetune.backbone_lr_ratio=1.0",
        "optimizer.lr=3e-3",
        "augment=none",
        "trainer.max_epochs=2",
        "logger=none",
        "report=true",
    ]
    run(compose_config("train", overrides, run_dir))
    return run_dir


def test_tuned_thresholds_find_a_known_optimum() -> None:
    """Label 0's positives lie in [0.30, 0.60], its negatives in [0, 0.25]: every cut between
    0.25 and 0.30 gives F1 1, and only those. Label 1's best cut keeps its top 3 (one negative
    among them at 0.8) rather than the 0.5 that would keep 4."""
    positives = torch.linspace(0.30, 0.60, 20)
    negatives = torch.linspace(0.0, 0.25, 30)
    probabilities = torch.cat([positives, negatives])
    truth = torch.cat([torch.ones(20), torch.zeros(30)]).bool()
    threshold = best_f1_threshold(probabilities, truth)
    assert 0.25 < threshold <= 0.30
    second = torch.tensor([0.9, 0.85, 0.8, 0.55, 0.2, 0.1])
    second_truth = torch.tensor([1, 1, 0, 0, 0, 0]).bool()
    assert 0.8 < best_f1_threshold(second, second_truth) <= 0.85
    both = tune_thresholds(
        torch.stack([probabilities[:6], second], dim=1), torch.stack([truth[:6], second_truth], 1)
    )
    assert both[1] == best_f1_threshold(second, second_truth)
    assert best_f1_threshold(second, torch.zeros(6).bool()) == 0.5  # no positive: no evidence


def test_kfold_and_validation_splits_keep_every_label_where_counts_allow() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(400, 6, generator=generator) < 0.3).float()
    labels[:5, 5], labels[5:, 5] = 1.0, 0.0  # a rare label: 5 images, one per fold
    folds = stratified_folds(labels, 5, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(400))
    for fold in folds:
        assert (labels[fold].sum(0) > 0).all(), "a fold lacks a label"
        shares = labels[fold].mean(0)[:5]
        assert torch.allclose(shares, labels.mean(0)[:5], atol=0.04)
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert len(held) == 80 and set(keep.tolist()).isdisjoint(held.tolist())
    assert (labels[held].sum(0) > 0).all() and (labels[keep].sum(0) > 0).all()
    assert torch.equal(stratified_folds(labels, 5, seed=0)[2], folds[2])  # seeded


def test_mixing_mixes_label_sets_and_leaves_single_labels_as_torchvision_mixes_them() -> None:
    options = AugmentOptions.parse({"mixup_alpha": 0.4, "mix_prob": 1.0})
    images = torch.rand(6, 3, 8, 8)
    sets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
    torch.manual_seed(0)
    mixed, hard, soft = BatchMix(options, 3)(images, sets.float())
    lam = float((mixed[0] - images[5]).flatten()[0] / (images[0] - images[5]).flatten()[0])
    assert torch.equal(hard, sets.float())
    assert torch.allclose(soft, lam * sets + (1 - lam) * sets.roll(1, 0), atol=1e-5)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    torch.manual_seed(0)
    ours = BatchMix(options, 3)(images, labels)
    torch.manual_seed(0)
    float(torch.rand(()))  # BatchMix's draw of whether to mix
    theirs = v2.MixUp(alpha=0.4, num_classes=3)(images, labels)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[1])


def test_the_asymmetric_loss_drops_easy_negatives_and_unfocused_it_is_bce() -> None:
    logits = torch.tensor([[-4.0, 0.5, 2.0], [-0.2, -5.0, 1.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    bce = training_loss("auto", True, 0.0, None, 0.0)
    assert torch.allclose(bce(logits, target), F.binary_cross_entropy_with_logits(logits, target))
    asl = training_loss("asl", True, 0.0, None, 0.0)
    asl(logits, target).backward()
    # sigmoid(-4) and sigmoid(-5) are below the 0.05 clip: those negatives give no gradient.
    assert logits.grad[0, 0] == 0 and logits.grad[1, 1] == 0
    assert logits.grad[0, 2] > 0 and logits.grad[1, 2] < 0
    focal = MultiLabelLoss(gamma_pos=2.0, gamma_neg=2.0)
    easy, hard = torch.tensor([[6.0]]), torch.tensor([[-1.0]])
    one = torch.ones(1, 1)
    ratio = focal(easy, one) / F.binary_cross_entropy_with_logits(easy, one)
    assert ratio < focal(hard, one) / F.binary_cross_entropy_with_logits(hard, one)
    with pytest.raises(UserError, match="model.loss=asl is for multi-label data"):
        training_loss("asl", False, 0.0, None, 0.0)


def test_settings_that_mean_one_class_per_image_are_refused_for_label_sets(
    mosaics: Path, tmp_path: Path
) -> None:
    for extra, words in (
        (["data.sampler=balanced"], "data.sampler=balanced need one class per image"),
        (["data.samples_per_class=5"], "data.samples_per_class=5"),
    ):
        cfg = compose_config("train", [*TINY, "data=csv", f"data.csv={mosaics}", *extra], tmp_path)
        with pytest.raises(UserError, match=words):
            run(cfg)
    assert CsvSource(mosaics).load().train.multilabel


def test_a_run_tunes_thresholds_into_its_checkpoint_and_reports_label_sets(
    multilabel_run: Path,
) -> None:
    metrics = json.loads((multilabel_run / "metrics.json").read_text())
    assert {"test/map", "test/f1_micro", "test/f1_macro", "val/map"} <= metrics.keys()
    assert metrics["test/acc"] == metrics["test/exact_match"]
    assert metrics["val/f1_macro_tuned"] >= metrics["val/f1_macro_at_0.5"]
    per_label = metrics["test/per_label"]
    assert len(per_label) == CLASSES
    assert all(set(v) == {"ap", "precision", "recall"} for v in per_label.values())
    model = load_trained(multilabel_run / "checkpoints" / "best.ckpt")
    thresholds = model.postprocessing.thresholds
    assert len(thresholds) == CLASSES and any(t != 0.5 for t in thresholds)
    report = json.loads((multilabel_run / "report.json").read_text())
    for name in ("map", "f1_micro", "f1_macro", "exact_match"):
        assert report["metrics"][name] == pytest.approx(metrics[f"test/{name}"], abs=1e-5)
    assert [row["threshold"] for row in sorted(report["per_label"], key=lambda r: r["index"])] == (
        pytest.approx(list(thresholds))
    )
    html = (multilabel_run / "report.html").read_text()
    assert "Per label" in html and "Precision-recall curves" in html and "Most-missed" in html


def test_eval_reproduces_the_test_metrics_and_adds_them_with_tta(
    multilabel_run: Path, mosaics: Path, tmp_path: Path
) -> None:
    """eval's figures equal training's; with tta=flip they are those of the flip-averaged
    probabilities of predict's Predictor at the stored thresholds."""
    best = multilabel_run / "checkpoints" / "best.ckpt"
    cfg = compose_config("eval", [f"ckpt_path={best}", "tta=flip", "report=false"], tmp_path)
    metrics = evaluate(cfg)
    trained = json.loads((multilabel_run / "metrics.json").read_text())
    test = CsvSource(mosaics).load().test
    predictor = Predictor.from_checkpoints([best], tta="flip")
    flipped = scores(
        predictor.probabilities(test.images), test.labels, "_tta", predictor.thresholds
    )
    for name in ("map", "f1_micro", "f1_macro", "exact_match"):
        assert metrics[f"test/{name}"] == pytest.approx(trained[f"test/{name}"], abs=1e-5)
        assert metrics[f"test/{name}_tta"] == pytest.approx(flipped[f"test/{name}_tta"], abs=1e-5)


def label_sets(rows: list[dict]) -> dict[str, str]:
    return {Path(row["path"]).name: row["labels"] for row in rows}


def test_the_checkpoint_its_onnx_export_and_the_server_give_the_same_label_sets(
    multilabel_run: Path, mosaics: Path, tmp_path: Path
) -> None:
    best = multilabel_run / "checkpoints" / "best.ckpt"
    inputs = mosaics.parent / "test"
    rows = {}
    for name, model in (("ckpt", f"ckpt_path={best}"), ("explained", f"ckpt_path={best}")):
        extra = ["explain=true"] if name == "explained" else []
        cfg = compose_config(
            "predict",
            ["device=cpu", model, f"inputs={inputs}", "out=p.json", *extra],
            tmp_path / name,
        )
        rows[name] = json.loads(predict(cfg).read_text())
    onnx = export_model(load_trained(best), best, "onnx", tmp_path / "export")
    record = json.loads((tmp_path / "export" / "export.json").read_text())["model.onnx"]
    assert record["label_set_agreement"] == 1.0 and record["max_sigmoid_diff"] <= 1e-4
    thresholds = load_trained(best).postprocessing.thresholds
    assert OnnxModel(onnx).metadata.postprocessing.thresholds == thresholds
    cfg = compose_config(
        "predict",
        ["device=cpu", f"model_path={onnx}", f"inputs={inputs}", "out=p.json"],
        tmp_path / "onnx",
    )
    rows["onnx"] = json.loads(predict(cfg).read_text())
    expected = label_sets(rows["ckpt"])
    assert len(expected) == 48 and any(expected.values())
    assert label_sets(rows["onnx"]) == expected
    first = rows["ckpt"][0]
    assert set(first) == {"path", "labels", "error"} | {
        f"prob_{c}" for c in load_trained(best).classes
    }
    for row in rows["explained"]:
        labels = row["labels"].split("|") if row["labels"] else [None]
        assert len(row["explanation"].split("|")) == len(labels)
    serve = compose_config(
        "serve", ["device=cpu", f"ckpt_path={best}", "model_name=sets"], tmp_path / "serve"
    )
    with loopback_server(build_app(serve)) as url, httpx.Client(base_url=url) as client:
        # The Open Inference Protocol's label is the set, joined as predict's labels column.
        some = sorted(inputs.glob("*.png"))[:4]
        files = [base64.b64encode(path.read_bytes()).decode() for path in some]
        image = {"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": files}
        answer = client.post("/v2/models/sets/infer", json={"inputs": [image]}).json()
        (label,) = [o for o in answer["outputs"] if o["name"] == "label"]
        assert label["data"] == [expected[path.name] for path in some]
        for path in sorted(inputs.glob("*.png"))[:12]:
            answer = client.post("/predict", content=path.read_bytes()).json()
            served = "|".join(item["label"] for item in answer["labels"])
            assert served == expected[path.name]
            row = next(r for r in rows["ckpt"] if Path(r["path"]).name == path.name)
            for label, prob in answer["probabilities"].items():
                assert prob == pytest.approx(row[f"prob_{label}"], abs=1e-5)
