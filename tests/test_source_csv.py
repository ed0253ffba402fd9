"""The CSV source: rows named by line when they cannot be used, label sets read as multi-hot rows,
and a single-label CSV of a folder's photos training exactly as the folder does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import FOLDER_RUN
from data_formats import write_image_folder
from thaw.config import compose_config
from thaw.data.sources.csv import CsvSource
from thaw.data.sources.imagefolder import ImageFolder
from thaw.errors import UserError
from thaw.train import run


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def folder_rows(root: Path, base: Path) -> list[str]:
    """`path,label,split` of every image of a root/<split>/<class>/ folder, relative to base."""
    return [
        f"{p.relative_to(base)},{p.parent.name},{p.parts[-3]}"
        for p in sorted(root.glob("*/*/*.png"))
    ]


def test_a_csv_with_bad_rows_names_every_row_by_its_line(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=2, splits=("",))
    lines = [
        "path,label,split",
        "a/img_0.png,a,train",
        "a/gone.png,a,train",
        "a/img_1.png,,train",
        "b/img_0.png,b,holdout",
        "a/img_0.png,b,val",
        ",a,",
        "b/img_1.png,b,",
    ]
    with pytest.raises(UserError) as raised:
        CsvSource(write_csv(tmp_path / "labels.csv", lines)).load()
    message = str(raised.value)
    assert "5 rows that cannot be used" in message
    for expected in (
        f"line 3: {tmp_path / 'a/gone.png'} does not exist",
        "line 4: a/img_1.png has an empty label",
        "line 5: b/img_0.png has split 'holdout', not one of train, val, test",
        "line 6: a/img_0.png is listed again (first on line 2)",
        "line 7: the path is empty",
    ):
        assert expected in message
    assert "line 8" not in message and "line 2:" not in message


def test_a_csv_without_its_columns_or_file_says_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.csv=.*nowhere.csv: no such file"):
        CsvSource(tmp_path / "nowhere.csv").load()
    bad_header = write_csv(tmp_path / "labels.csv", ["file,class", "a.png,a"])
    with pytest.raises(UserError, match="no path and no label column"):
        CsvSource(bad_header).load()


def test_label_sets_are_multi_hot_rows_of_every_class(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["x"], n_per_class=4, splits=("",))
    lines = ["path,label", "x/img_0.png,coat|red", "x/img_1.png,red", "x/img_2.png, shirt | coat |"]
    splits = CsvSource(write_csv(tmp_path / "labels.csv", lines)).load()
    assert splits.train.classes == ["coat", "red", "shirt"]
    assert splits.train.multilabel
    assert splits.train.labels.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    single = write_csv(
        tmp_path / "single.csv", ["path,label", "x/img_0.png,red", "x/img_1.png,coat"]
    )
    assert not CsvSource(single).load().train.multilabel
    forced = CsvSource(single, multilabel=True).load().train
    assert forced.multilabel and forced.labels.tolist() == [[0, 1], [1, 0]]


def test_a_test_csv_is_the_test_split_and_may_not_overlap(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a", "b"], n_per_class=3, splits=("",))
    train = write_csv(tmp_path / "train.csv", ["path,label", "a/img_0.png,a", "b/img_0.png,b"])
    test = write_csv(tmp_path / "test.csv", ["path,label", "a/img_1.png,a", "b/img_1.png,b"])
    source = CsvSource(train, test_csv=test)
    assert [p.name for p in source.load().test.images] == ["img_1.png", "img_1.png"]
    assert source.load_test().labels.tolist() == [0, 1]
    assert CsvSource(train).load_test() is None
    with pytest.raises(UserError, match="in both .*train.csv and data.test_csv"):
        CsvSource(train, test_csv=train).load()


def test_a_csv_of_a_folder_reads_the_same_images_labels_and_classes(photo_folder: Path) -> None:
    base = photo_folder.parent
    csv = write_csv(base / "photos.csv", ["path,label,split", *folder_rows(photo_folder, base)])
    from_csv, from_folder = CsvSource(csv).load(), ImageFolder(photo_folder).load()
    for split in ("train", "val", "test"):
        a, b = getattr(from_csv, split), getattr(from_folder, split)
        assert (a.images, a.classes) == (b.images, b.classes)
        assert torch.equal(a.labels, b.labels)


def test_data_csv_trains_the_weights_the_folder_trains(photo_folder: Path, tmp_path: Path) -> None:
    """The same photos listed in a CSV by absolute path (train rows only: val and test are
    split off, as for a folder without them) and as class folders: the same seeded run, bit
    for bit."""
    train_dir = photo_folder / "train"
    rows = [f"{p},{p.parent.name}" for p in sorted(train_dir.glob("*/*.png"))]  # absolute
    csv = write_csv(tmp_path / "labels.csv", ["path,label", *rows])
    recipe = [o for o in FOLDER_RUN if o != "data=imagefolder"]
    recipe += ["trainer.max_epochs=1", "report=false"]
    runs = {
        "folder": [*recipe, "data=imagefolder", f"data.root={train_dir}"],
        "csv": [*recipe, "data=csv", f"data.csv={csv}"],
    }
    weights = {}
    for name, overrides in runs.items():
        metrics = run(compose_config("train", overrides, tmp_path / name))
        assert metrics["test/acc"] > 0
        last = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        weights[name] = last["state_dict"]
    assert weights["csv"].keys() == weights["folder"].keys()
    assert all(torch.equal(weights["csv"][k], weights["folder"][k]) for k in weights["csv"])
