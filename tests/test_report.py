"""The evaluation report: per-class numbers as sklearn counts them, the most-confused pairs,
every section of report.html with images that decode, HTML in class names escaped, a 2-class and
a 100-class report, the figures in TensorBoard, and the report a training run writes."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from classifiers import classifier
from conftest import FOLDER_CLASSES, PREPROCESSING
from thaw.analysis.evaluation_report import write_report
from thaw.analysis.figures import confused_classes
from thaw.analysis.html import png_bytes, render
from thaw.analysis.interpretation import confusion_matrix, headline, most_confused, per_class
from thaw.models import ImageClassifier
from thaw.models.backbones import create_backbone

SECTIONS = [
    "summary",
    "per-class",
    "confusion",
    "confused-pairs",
    "top-losses",
    "gradcam",
    "calibration",
    "model-size",
]


def test_per_class_numbers_are_sklearns_counts():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predicted = torch.tensor([0, 0, 1, 2, 1, 1, 0, 2, 2, 2])
    matrix = confusion_matrix(predicted, labels, 3)
    assert matrix.tolist() == [[2, 1, 1], [1, 2, 0], [0, 0, 3]]
    rows = per_class(matrix, ["a", "b", "c"])
    # By hand: precision = hits / predicted as the class, recall = hits / support.
    expected = [
        ("a", 2 / 3, 2 / 4, 4),
        ("b", 2 / 3, 2 / 3, 3),
        ("c", 3 / 4, 3 / 3, 3),
    ]
    for row, (name, precision, recall, support) in zip(rows, expected, strict=True):
        f1 = 2 * precision * recall / (precision + recall)
        assert row == pytest.approx(
            {"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support}
        )
    assert most_confused(matrix, 10) == [(0, 1, 1), (0, 2, 1), (1, 0, 1)]


def test_a_class_never_predicted_or_absent_scores_zero_not_nan():
    matrix = torch.tensor([[3, 0], [2, 0]])  # class 1 is never predicted
    rows = per_class(matrix, ["a", "b"])
    assert rows[1]["precision"] == rows[1]["recall"] == rows[1]["f1"] == 0.0
    assert rows[0]["recall"] == 1.0 and rows[0]["precision"] == pytest.approx(0.6)


def test_top5_only_means_something_above_five_classes():
    logits = torch.randn(20, 5)
    labels = torch.randint(0, 5, (20,))
    table = per_class(confusion_matrix(logits.argmax(1), labels, 5), list("abcde"))
    assert "acc_top5" not in headline(logits, labels, table)
    wide = torch.randn(20, 6)
    table = per_class(confusion_matrix(wide.argmax(1), labels, 6), list("abcdef"))
    values = headline(wide, labels, table)
    top5 = (wide.topk(5, dim=1).indices == labels[:, None]).any(dim=1).double().mean()
    assert values["acc_top5"] == pytest.approx(float(top5))


def test_a_large_confusion_matrix_shows_its_most_confused_classes():
    matrix = torch.diag(torch.full((200,), 10))
    matrix[7, 150] = 9
    matrix[42, 7] = 5
    shown = confused_classes(matrix, limit=20)
    assert len(shown) == 20 and {7, 42, 150} <= set(shown)
    assert confused_classes(torch.eye(12, dtype=torch.long), limit=20) == list(range(12))


def decoded_images(page: str) -> list[Image.Image]:
    images = []
    for payload in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        image = Image.open(io.BytesIO(base64.b64decode(payload)))
        image.load()
        images.append(image)
    return images


def assert_complete_page(page: str, report: dict) -> None:
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside
    images = decoded_images(page)
    pictures = 2 + len(report["top_losses"]) + len(report["gradcam"]["correct"])
    pictures += sum(len(pair["examples"]) for pair in report["most_confused"])
    assert len(images) == pictures


def test_html_in_a_class_name_is_escaped_not_run():
    evil = "<script>alert(1)</script>"
    cell = {"class": evil, "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    report = {
        "summary": {"model": "resnet18", "data": f"/data/{evil}", "classes": 2},
        "metrics": {"acc": 0.5, "f1_macro": 0.5},
        "test_images": 4,
        "per_class": [cell, {**cell, "class": "cat"}],
        "most_confused": [
            {
                "true": evil,
                "predicted": "cat",
                "true_index": 0,
                "predicted_index": 1,
                "count": 1,
                "examples": [3],
            }
        ],
        "top_losses": [{"true": evil, "predicted": "cat", "prob": 0.9}],
        "gradcam": {
            "layer": "layer4",
            "max_classes": 16,
            "correct": [{"class": evil, "prob": 0.8}],
        },
        "calibration": {
            "temperature": 1.0,
            "ece": 0.1,
            "ece_calibrated": 0.1,
            "nll": 0.7,
            "nll_calibrated": 0.7,
        },
        "model_size": {
            "parameters": 1234567,
            "megabytes": 4.7,
            "flops_per_image": 2e9,
            "input_size": 224,
        },
    }
    png = png_bytes(Image.new("RGB", (4, 4)))
    names = ["confusion", "reliability", "confused_0_1_0", "top_loss_0", "gradcam_0"]
    page = render(report, dict.fromkeys(names, png))
    assert_complete_page(page, report)
    assert evil not in page and page.count("<script>") == 1  # only the page's own sort script
    # The heading, summary table, per-class row, pair heading, and two captions and their alts.
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 8
    assert "<td>1,234,567</td>" in page and "2.000 G (224 px)" in page


def test_the_training_run_writes_a_complete_report(folder_run):
    report = json.loads((folder_run / "report.json").read_text())
    metrics = json.loads((folder_run / "metrics.json").read_text())
    # The report's own pass over the test set agrees with Lightning's test metrics.
    assert report["confusion_matrix"] == metrics["test/confusion_matrix"]
    assert report["metrics"]["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert "acc_top5" not in report["metrics"]  # 3 classes
    table = per_class(torch.tensor(report["confusion_matrix"]), sorted(FOLDER_CLASSES))
    assert report["per_class"] == sorted(table, key=lambda row: (row["f1"], row["class"]))
    assert report["summary"]["model"] == "resnet18" and report["summary"]["classes"] == 3
    assert report["summary"]["wall_time"] == f"{metrics['train/wall_time_s']:.0f} s"
    size = report["model_size"]
    resnet18_params = sum(p.numel() for p in create_backbone("resnet18", None).model.parameters())
    assert size["parameters"] == resnet18_params + 512 * 3 + 3  # backbone and the 3-class head
    assert size["flops_per_image"] > 1e7
    calibration = report["calibration"]
    assert sum(b["count"] for b in calibration["bins"]) == report["test_images"]
    assert_complete_page((folder_run / "report.html").read_text(), report)


def random_classifier(classes: int) -> ImageClassifier:
    torch.manual_seed(0)
    names = [f"class {i:03d}" for i in range(classes)]
    config = {"model": {"name": "resnet18"}, "finetune": {"_target_": "thaw.finetune.TwoPhase"}}
    return classifier(create_backbone("resnet18", None), names, PREPROCESSING, config=config)


def random_batches(classes: int, n: int, size: int = 28) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=generator)
    labels = torch.arange(n) % classes
    return [(images[i : i + 64], labels[i : i + 64]) for i in range(0, n, 64)]


@pytest.mark.parametrize("classes", [2, 100])
def test_two_and_a_hundred_classes_give_a_sane_report(classes, tmp_path):
    model = random_classifier(classes)
    writer = SummaryWriter(tmp_path / "tb")
    report = write_report(
        model, random_batches(classes, 160), tmp_path, model.config, tensorboard=[writer]
    )
    writer.close()
    page = (tmp_path / "report.html").read_text()
    assert_complete_page(page, report)
    assert ("acc_top5" in report["metrics"]) == (classes > 5)
    assert ("top-5 accuracy" in page) == (classes > 5)
    assert len(report["per_class"]) == classes
    assert len(report["gradcam"]["correct"]) <= 16
    confusion = decoded_images(page)[0]  # the first figure on the page
    assert confusion.size[0] < 3000  # at most the 20 most-confused classes: 100 would be 9000 px
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"test/reliability", "test/top_losses", "test/gradcam"} <= set(events.Tags()["images"])
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
