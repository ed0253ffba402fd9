"""Finding mislabelled photos and training on the review: label_issues.py on a folder of real
Fashion-MNIST photos with known flipped labels ranks the flips first, from out-of-fold
probabilities of models that never trained on them, and writes a queue that Label Studio
imports; data.exclude and data.relabel change exactly the images they name."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REAL_FMNIST, REAL_RECIPE, TINY, offline_fmnist, run_cli
from thaw.build import build_datamodule, trained_run_config
from thaw.config import compose_config
from thaw.data.sources.fashion_mnist import FashionMNIST
from thaw.errors import UserError
from thaw.inference.predictor import Predictor
from thaw.label_issues import find_issues
from thaw.models import load_trained
from thaw.train import run

CLASSES = ["Trouser", "Sneaker", "Bag"]
PER_CLASS = 100
FLIPS_PER_CLASS = 3
FOLDS = 3


@pytest.fixture(scope="module")
def noisy_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Path, str]]:
    """PER_CLASS real photos of each class in class folders, FLIPS_PER_CLASS of each filed
    under the next class: the folder, and each flipped file with its true class."""
    root = tmp_path_factory.mktemp("noisy")
    train = FashionMNIST(root / "empty", system_dir=REAL_FMNIST, download=False).load().train
    flipped = {}
    for c, name in enumerate(CLASSES):
        chosen = (train.labels == train.classes.index(name)).nonzero().flatten()[:PER_CLASS]
        for n, i in enumerate(chosen.tolist()):
            filed = CLASSES[(c + 1) % len(CLASSES)] if n < FLIPS_PER_CLASS else name
            path = root / filed / f"{name}_{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(train.images[i][0].numpy()).save(path)
            if filed != name:
                flipped[path.resolve()] = name
    return root, flipped


def review_overrides(folder: Path) -> list[str]:
    return [
        *TINY,
        "data=imagefolder",
        f"data.root={folder}",
        "data.image_size=28",
        "logger=none",
        "++callbacks.batch_preview=null",
        *REAL_RECIPE,
        "trainer.max_epochs=4",
        f"folds={FOLDS}",
    ]


@pytest.fixture(scope="module")
def review(noisy_folder: tuple[Path, dict[Path, str]], tmp_path_factory) -> Path:
    """The run dir of `python label_issues.py` on the noisy folder."""
    run_dir = tmp_path_factory.mktemp("review") / "run"
    result = run_cli("label_issues", review_overrides(noisy_folder[0]), run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "label issues in" in result.stdout  # the count and the top rows on the console
    return run_dir


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_flipped_labels_rank_at_the_top(review, noisy_folder):
    _, flipped = noisy_folder
    issues = rows(review / "label_issues.csv")
    assert list(issues[0]) == ["path", "given", "suggested", "quality", "rank"]
    assert [int(r["rank"]) for r in issues] == list(range(1, len(issues) + 1))
    quality = [float(r["quality"]) for r in issues]
    assert quality == sorted(quality)  # worst first
    top = issues[: len(flipped)]
    hits = [r for r in top if Path(r["path"]) in flipped]
    assert len(hits) >= len(flipped) - 2, top
    for row in hits:  # the suggestion is the true class, the given one the folder's
        assert row["suggested"] == flipped[Path(row["path"])]
        assert row["given"] == Path(row["path"]).parent.name
    page = (review / "label_issues.html").read_text()
    assert Path(top[0]["path"]).name in page and "data:image/png;base64," in page


def test_out_of_fold_probabilities_come_from_models_that_never_saw_the_image(review):
    scored = rows(review / "oof_images.csv")
    probabilities = np.load(review / "oof_probs.npy")
    assert probabilities.shape == (len(scored), len(CLASSES))
    paths = [r["path"] for r in scored]
    assert len(set(paths)) == len(paths)  # every pool image once
    for fold in range(FOLDS):
        best = review / f"fold_{fold}" / "checkpoints" / "best.ckpt"
        model = load_trained(best)
        datamodule = build_datamodule(trained_run_config(model.config, None), model.preprocessing)
        datamodule.setup("fit")
        trained_on = {str(p) for p in datamodule.train_set.images}
        held = [i for i, r in enumerate(scored) if int(r["fold"]) == fold]
        assert held and not trained_on & {paths[i] for i in held}
        assert trained_on | {paths[i] for i in held} == set(paths)  # the folds cover the pool
        # The row is that fold's model's (calibrated) answer for that file.
        again = Predictor.from_trained([model]).probabilities([Path(paths[i]) for i in held])
        torch.testing.assert_close(again, torch.from_numpy(probabilities[held]), atol=1e-5, rtol=0)


def test_a_rerun_in_the_same_dir_reuses_the_finished_folds(review, noisy_folder):
    checkpoints = sorted(review.glob("fold_*/checkpoints/*.ckpt"))
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    written = (review / "label_issues.csv").read_text()
    find_issues(compose_config("label_issues", review_overrides(noisy_folder[0]), review))
    assert [p.stat().st_mtime_ns for p in checkpoints] == stamps  # no fold trained again
    assert (review / "label_issues.csv").read_text() == written


def test_the_label_studio_file_is_a_task_list_of_its_import_format(review):
    tasks = json.loads((review / "label_studio.json").read_text())
    issues = rows(review / "label_issues.csv")
    scored = {r["path"]: i for i, r in enumerate(rows(review / "oof_images.csv"))}
    probabilities = np.load(review / "oof_probs.npy")
    assert isinstance(tasks, list) and len(tasks) == len(issues)
    interface = ElementTree.parse(review / "label_studio.xml").getroot()
    image, choices = interface.find("Image"), interface.find("Choices")
    assert image.get("value") == "$image" and choices.get("toName") == image.get("name")
    assert [c.get("value") for c in choices.findall("Choice")] == sorted(CLASSES)
    for task, issue in zip(tasks, issues, strict=True):
        assert task["data"]["image"].startswith("/data/local-files/?d=")
        assert task["data"]["path"] == issue["path"]
        (prediction,) = task["predictions"]
        (result,) = prediction["result"]
        assert result["from_name"] == choices.get("name")
        assert result["to_name"] == image.get("name")
        assert result["type"] == "choices"
        assert result["value"] == {"choices": [issue["suggested"]]}
        # Its score is the out-of-fold probability of the suggestion.
        row = probabilities[scored[issue["path"]]]
        assert prediction["score"] == pytest.approx(
            float(row[sorted(CLASSES).index(issue["suggested"])])
        )


def write_csv(path: Path, header: list[str], lines: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(lines)
    return path


def loaded(*overrides: str, root: Path, tmp_path: Path):
    cfg = compose_config("train", [*TINY, *overrides], tmp_path / "run")
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def members(datamodule, split: str) -> dict:
    imageset = getattr(datamodule, f"{split}_set")
    keys = imageset.ids.tolist() if imageset.in_memory else [str(p) for p in imageset.images]
    return dict(zip(keys, imageset.labels.tolist(), strict=True))


@pytest.mark.parametrize("source", ["folder", "in-memory"])
def test_exclude_and_relabel_change_exactly_the_images_they_name(
    source, noisy_folder, fmnist_root, tmp_path
):
    if source == "folder":
        data = ["data=imagefolder", f"data.root={noisy_folder[0]}", "data.image_size=28"]
    else:
        data = offline_fmnist(fmnist_root)
    before = loaded(*data, root=tmp_path, tmp_path=tmp_path)
    splits = {split: members(before, split) for split in ("train", "val", "test")}
    column = "path" if source == "folder" else "index"
    # Two images of every split dropped, one of every split relabelled to the next class.
    dropped = [key for split in splits.values() for key in list(split)[:2]]
    renamed = {list(split)[2]: (split[list(split)[2]] + 1) % 3 for split in splits.values()}
    classes = before.classes
    exclude = write_csv(tmp_path / "exclude.csv", [column], [[k] for k in dropped])
    relabel = write_csv(
        tmp_path / "relabel.csv", [column, "label"], [[k, classes[v]] for k, v in renamed.items()]
    )
    after = loaded(
        *data,
        f"data.exclude={exclude}",
        f"data.relabel={relabel}",
        root=tmp_path,
        tmp_path=tmp_path,
    )
    for split, was in splits.items():
        expected = {k: renamed.get(k, v) for k, v in was.items() if k not in dropped}
        assert members(after, split) == expected, split
    assert after.counts == {"data/excluded": len(dropped), "data/relabelled": len(renamed)}


def test_a_run_on_a_review_counts_what_it_touched_and_trains_on_a_last_batch_of_one(
    fmnist_root, tmp_path
):
    """So many of the generated training images excluded that 16 k + 1 remain: the last batch
    of every epoch (TINY's batch size is 16) holds one image, which BatchNorm cannot train on."""
    data = offline_fmnist(fmnist_root)
    train = members(loaded(*data, root=tmp_path, tmp_path=tmp_path / "probe"), "train")
    dropped = (len(train) - 1) % 16
    exclude = write_csv(tmp_path / "exclude.csv", ["index"], [[k] for k in list(train)[:dropped]])
    metrics = run(
        compose_config(
            "train",
            [*TINY, *data, "finetune=full", f"data.exclude={exclude}"],
            tmp_path / "trained",
        )
    )
    written = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert dropped > 0 and metrics["data/excluded"] == written["data/excluded"] == dropped


@pytest.mark.parametrize(
    ("setting", "content", "message"),
    [
        ("exclude", None, "no such file"),
        ("exclude", "name\nfoo.png\n", "needs a header row with a path column"),
        ("relabel", "index\n3\n", "and a label column"),
        ("relabel", "index,label\n3,Unicorn\n", "label 'Unicorn' is not a class"),
        ("exclude", "index\nfour\n", "line 2: needs a path or an index"),
        ("exclude", "path\nelsewhere/x.png\n", "none of its 1 images is in the data"),
    ],
)
def test_a_bad_review_list_names_the_file_and_the_fix(
    setting, content, message, fmnist_root, tmp_path
):
    path = tmp_path / "list.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as raised:
        loaded(
            *offline_fmnist(fmnist_root), f"data.{setting}={path}", root=tmp_path, tmp_path=tmp_path
        )
    assert f"data.{setting}={path}" in str(raised.value)
