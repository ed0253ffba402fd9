"""The rejection rule on real photos: a model trained on three Fashion-MNIST classes keeps about
95% of its own test images and rejects most images of classes it never saw; the rule travels
into predict (score, known, the label `unknown`), into the ONNX graph (the same score and the
same known column), and a checkpoint from before the rule predicts as it did, says so, and gets
one from fit_reject.py without training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REAL_FMNIST, REAL_RECIPE, TINY
from thaw.build import build_datamodule, build_strategy, build_task
from thaw.checkpoint import DIGEST_KEY, REJECTION_PREFIX
from thaw.config import compose_config
from thaw.data.sources.fashion_mnist import FashionMNIST
from thaw.errors import UserError
from thaw.evaluate import evaluate
from thaw.export import export_model
from thaw.fit_reject import task as fit_reject
from thaw.inference.onnx_model import OnnxModel
from thaw.models import load_trained
from thaw.openset.extend import extend_head
from thaw.openset.scores import OpenSetScore
from thaw.predict import predict
from thaw.train import run
from thaw.training_checks import check_training_config

KNOWN = ["Trouser", "Bag", "Sneaker"]
HELD_OUT = ["T-shirt/top", "Pullover"]  # kinds of product the model never saw
PER_CLASS = 100  # test photos per class written to disk for predict


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 trained from random init on 300 real photos of each KNOWN class."""
    root = tmp_path_factory.mktemp("openset")
    overrides = [
        *TINY,
        f"data.root={root / 'empty'}",
        "data.source.download=false",
        f"data.source.system_dir={REAL_FMNIST}",
        f"data.classes=[{','.join(KNOWN)}]",
        "data.samples_per_class=300",
        "data.val_fraction=0.2",
        *REAL_RECIPE,
    ]
    run(compose_config("train", overrides, root / "run"))
    return root / "run"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """PER_CLASS real test photos of every class as PNG files, by class."""
    folder = tmp_path_factory.mktemp("photos")
    test = FashionMNIST(folder / "empty", system_dir=REAL_FMNIST, download=False).load().test
    written: dict[str, list[Path]] = {}
    for label, name in enumerate(test.classes):
        chosen = (test.labels == label).nonzero().flatten()[:PER_CLASS].tolist()
        stem = name.replace("/", "_")
        written[name] = [folder / f"{stem}_{i}.png" for i in chosen]
        for i, path in zip(chosen, written[name], strict=True):
            Image.fromarray(test.images[i][0].numpy()).save(path)
    return written


def predicted(tmp_path: Path, *overrides: str) -> dict[str, dict[str, str]]:
    out = predict(compose_config("predict", ["device=cpu", *overrides], tmp_path))
    with out.open() as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def known_share(rows: dict[str, dict[str, str]], paths: list[Path]) -> float:
    return sum(rows[str(p)]["known"] == "True" for p in paths) / len(paths)


def test_the_rule_keeps_its_own_classes_and_rejects_unseen_ones(real_run, photos, tmp_path):
    best = real_run / "checkpoints" / "best.ckpt"
    rule = load_trained(best).postprocessing.rejection
    assert (rule.score, rule.keep, rule.label) == ("mahalanobis", 0.95, "unknown")
    inputs = [p for name in [*KNOWN, *HELD_OUT] for p in photos[name]]
    (tmp_path / "inputs.txt").write_text("\n".join(map(str, inputs)))
    rows = predicted(
        tmp_path, f"ckpt_path={best}", f"inputs={tmp_path / 'inputs.txt'}", "reject=true"
    )

    kept = known_share(rows, [p for name in KNOWN for p in photos[name]])
    assert 0.92 <= kept <= 0.98, kept  # reject.keep=0.95 of the known validation images
    for name in HELD_OUT:
        assert known_share(rows, photos[name]) < 0.2, name  # 0.09 and 0.05 here
    for row in rows.values():  # reject=true: the label says so, the top-k keep the classes
        assert row["label"] == (row["top1_label"] if row["known"] == "True" else "unknown")
        assert float(row["score"]) >= rule.threshold if row["known"] == "True" else True


def test_the_onnx_graph_computes_the_same_score_and_known(real_run, photos, tmp_path):
    best = real_run / "checkpoints" / "best.ckpt"
    trained = load_trained(best)
    onnx_path = export_model(trained, best, "onnx", tmp_path)
    exported = OnnxModel(onnx_path)
    assert exported.metadata.postprocessing == trained.postprocessing  # method and threshold
    images = torch.stack(
        [
            trained.preprocessing.transform()(Image.open(p).convert("RGB"))
            for name in [*KNOWN, *HELD_OUT]
            for p in photos[name][:20]
        ]
    )
    with torch.inference_mode():
        _, expected = trained.scored(images)
    _, got = exported.scored(images)
    assert (got - expected).abs().max() <= 1e-4

    inputs = [str(p) for name in [*KNOWN, *HELD_OUT] for p in photos[name]]
    (tmp_path / "inputs.txt").write_text("\n".join(inputs))
    listed = f"inputs={tmp_path / 'inputs.txt'}"
    from_checkpoint = predicted(tmp_path / "ckpt", f"ckpt_path={best}", listed)
    from_onnx = predicted(tmp_path / "onnx", f"model_path={onnx_path}", listed)
    assert [r["known"] for r in from_onnx.values()] == [
        r["known"] for r in from_checkpoint.values()
    ]


def test_a_checkpoint_from_before_the_rule_predicts_says_so_and_gets_one(
    real_run, photos, tmp_path, caplog
):
    old = tmp_path / "old.ckpt"
    checkpoint = torch.load(real_run / "checkpoints" / "best.ckpt", weights_only=True)
    record = checkpoint["thaw"]
    del record["postprocessing"]["rejection"], record[DIGEST_KEY]  # as thaw wrote them before
    for name in [k for k in checkpoint["state_dict"] if k.startswith(REJECTION_PREFIX)]:
        del checkpoint["state_dict"][name]
    torch.save(checkpoint, old)
    inputs = f"inputs={photos['Bag'][0].parent}"

    with caplog.at_level("INFO"):
        rows = predicted(tmp_path / "plain", f"ckpt_path={old}", inputs)
    assert "score" not in next(iter(rows.values())) and len(rows) == 10 * PER_CLASS
    assert "has no rejection rule" in caplog.text
    with pytest.raises(UserError, match="reject=true: .* has no rejection rule.*fit_reject.py"):
        predicted(tmp_path / "refused", f"ckpt_path={old}", inputs, "reject=true")

    fit_reject(compose_config("fit_reject", [f"ckpt_path={old}", "device=cpu"], tmp_path / "fit"))
    assert load_trained(old).postprocessing.rejection.score == "mahalanobis"
    rows = predicted(tmp_path / "rejecting", f"ckpt_path={old}", inputs, "reject=true")
    assert known_share(rows, photos["Pullover"]) < 0.2


def test_the_feature_scores_are_what_they_say(tmp_path):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=generator) + torch.arange(2).repeat(100)[:, None] * 3
    labels = torch.arange(2).repeat(100)
    queries = torch.randn(5, 8, generator=generator) * 4

    mahalanobis = OpenSetScore("mahalanobis", 8, 2)
    mahalanobis.fit(features, labels, generator)
    nearest = torch.stack(
        [
            torch.stack([(q - m) @ mahalanobis.precision @ (q - m) for m in mahalanobis.means])
            for q in queries
        ]
    ).amin(1)
    assert torch.allclose(mahalanobis(queries, torch.zeros(5, 2), 1.0), 8 / (8 + nearest))

    knn = OpenSetScore("knn", 8, 2, bank_size=200, k=3)
    knn.fit(features, labels, generator)
    cosine = torch.nn.functional.cosine_similarity(queries[:, None], features[None], dim=2)
    assert torch.allclose(knn(queries, torch.zeros(5, 2), 1.0), cosine.sort(1).values[:, -3])


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("reject.keep=1.5", "reject.keep must be a number in \\[0, 1\\], got 1.5"),
        ("reject.keep=1", "reject.keep must be between 0 and 1"),
        ("reject.score=odin", "reject.score must be one of"),
        ("reject.k=0", "reject.k must be an integer >= 1"),
    ],
)
def test_a_mistaken_reject_setting_is_refused_before_training(train_config, override, words):
    with pytest.raises(UserError, match=words):
        check_training_config(train_config(override))


def test_eval_scores_an_ood_folder_and_reports_it(real_run, photos, tmp_path):
    ood = tmp_path / "ood"
    ood.mkdir()
    for name in HELD_OUT:
        for path in photos[name]:
            (ood / path.name).symlink_to(path)
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={real_run / 'checkpoints' / 'best.ckpt'}",
            f"ood={ood}",
            "trainer.accelerator=cpu",
        ],
        tmp_path / "eval",
    )
    metrics = evaluate(cfg)
    assert metrics["test/ood_auroc"] > 0.9 and metrics["test/ood_fpr95"] < 0.3, metrics
    assert metrics["test/ood_rejected"] > 0.8 and 0.92 <= metrics["test/known_kept"] <= 0.98
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["open_set"]["ood_images"] == len(HELD_OUT) * PER_CLASS
    assert report["open_set"]["ood_auroc"] == metrics["test/ood_auroc"]
    accuracy = report["open_set"]["accuracy_coverage"]["accuracy"]
    assert accuracy[0] >= accuracy[-1]  # keeping only the most typical images is more accurate
    assert 'id="open-set"' in (tmp_path / "eval" / "report.html").read_text()


def extend_overrides(real_run: Path, *more: str) -> list[str]:
    """Training on KNOWN and Sandal from the trained model, with model.head=extend."""
    return [
        *TINY,
        f"data.root={real_run.parent / 'empty'}",
        "data.source.download=false",
        f"data.source.system_dir={REAL_FMNIST}",
        f"data.classes=[Sandal,{','.join(KNOWN)}]",  # a new order: rows go by name
        "data.samples_per_class=100",
        f"model.weights={real_run / 'checkpoints' / 'best.ckpt'}",
        "model.head=extend",
        *more,
    ]


def test_an_extended_head_starts_with_the_old_rows_bit_for_bit(real_run, tmp_path, caplog):
    cfg = compose_config("train", extend_overrides(real_run), tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    model = build_task(cfg, datamodule, build_strategy(cfg)).model
    with caplog.at_level("INFO"):
        extension = extend_head(model, cfg.model.weights, datamodule)
    old = load_trained(real_run / "checkpoints" / "best.ckpt")
    assert (extension.old, extension.new) == (KNOWN, ["Sandal"])
    for name in KNOWN:
        row, old_row = model.classes.index(name), old.classes.index(name)
        assert torch.equal(model.head[1].weight[row], old.head[1].weight[old_row]), name
        assert torch.equal(model.head[1].bias[row], old.head[1].bias[old_row]), name
    new_row = model.head[1].weight[model.classes.index("Sandal")]
    assert torch.isclose(new_row.norm(), old.head[1].weight.norm(dim=1).mean())
    assert "3 classes keep their head rows (Trouser, Bag, Sneaker); 1 are new" in caplog.text


def test_an_extended_run_reports_the_old_classes_before_and_after(real_run, tmp_path):
    metrics = run(
        compose_config(
            "train",
            extend_overrides(real_run, "trainer.max_epochs=2", "finetune.freeze_epochs=1"),
            tmp_path,
        )
    )
    assert metrics["test/acc_old_classes_before"] > 0.9  # the trained model on its own classes
    assert metrics["test/acc_old_classes"] > 0.8  # kept, with Sandal learnt beside them
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test/acc_old_classes_before"] == metrics["test/acc_old_classes_before"]


def test_extend_needs_a_thaw_checkpoint(train_config):
    with pytest.raises(UserError, match="model.head=extend adds classes .* got 'IMAGENET1K_V1'"):
        check_training_config(train_config("model.head=extend", "model.weights=IMAGENET1K_V1"))
