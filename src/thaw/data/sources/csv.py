"""Images listed in a CSV: the way a catalogue export or a labelling tool brings its labels.

    path,label[,split]          path relative to the CSV's folder (or absolute)
    shirts/001.jpg,Shirt        one label: a class, as a class folder would give it
    look/17.jpg,Shirt|Coat      several, separated by `|`: a multi-label set
    ...,...,test                split: train, val or test (empty: train); or data.test_csv

Other columns are ignored. Class names are the sorted labels the rows use. A row that cannot be
used (no such file, an empty label, an unknown split, a path listed twice) is named with its line
number before any image is read.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from thaw.data.sources.base import SPLITS, ImageSet, Splits
from thaw.data.sources.download import DataUnavailableError
from thaw.errors import UserError

LABEL_SEPARATOR = "|"
_SHOWN_BAD_ROWS = 5


@dataclass(frozen=True)
class Row:
    """One usable line of a CSV: its image, its labels and its split."""

    path: Path
    labels: tuple[str, ...]
    split: str


class CsvSource:
    """The images and labels of `csv` (and of `test_csv`, every row a test image).

    Single-label rows become an ImageSet of class indices, as an image folder's do; with
    `multilabel`, or as soon as one row has several labels, every image gets a multi-hot row of
    all the classes (ImageSet.multilabel). A split the rows do not give is None, so the
    DataModule splits it off train as it does for folders."""

    DATA_KEYS: ClassVar[tuple[str, ...]] = ("csv", "test_csv", "multilabel")

    def __init__(
        self,
        csv: str | Path,
        test_csv: str | Path | None = None,
        multilabel: bool = False,
        root: str | Path | None = None,
    ) -> None:
        if not isinstance(multilabel, bool):
            raise UserError(f"data.multilabel must be true or false, got {multilabel!r}")
        base = Path(root) if root else Path()
        self.csv = base / csv
        self.test_csv = None if test_csv is None else base / test_csv
        self.multilabel = multilabel

    def prepare(self) -> None:
        """Nothing to download; fail early when a CSV is not there."""
        for key, path in (("data.csv", self.csv), ("data.test_csv", self.test_csv)):
            if path is not None and not path.is_file():
                raise DataUnavailableError(
                    f"{key}={path}: no such file. Give a CSV with columns path and label "
                    "(and optionally split), paths relative to its folder"
                )

    def load(self) -> Splits:
        rows = self._rows()
        classes, multilabel = _classes(rows, self.multilabel)
        sets = {
            split: _imageset([r for r in rows if r.split == split], classes, multilabel)
            for split in SPLITS
        }
        if sets["train"] is None:
            raise UserError(f"{self.csv} has no training rows (split empty or train)")
        return Splits(train=sets["train"], val=sets["val"], test=sets["test"])

    def load_test(self) -> ImageSet | None:
        """The test rows alone, with every class of the CSVs (None without test rows: the test
        set is then split off train)."""
        rows = self._rows()
        classes, multilabel = _classes(rows, self.multilabel)
        return _imageset([r for r in rows if r.split == "test"], classes, multilabel)

    def _rows(self) -> list[Row]:
        self.prepare()
        rows = read_rows(self.csv)
        if self.test_csv is None:
            return rows
        if any(row.split == "test" for row in rows):
            raise UserError(
                f"{self.csv} has rows with split test and data.test_csv={self.test_csv} gives a "
                "test set too: use one of them"
            )
        test = read_rows(self.test_csv, split="test")
        again = sorted({r.path for r in rows} & {r.path for r in test})
        if again:
            raise UserError(
                f"{len(again)} images are in both {self.csv} and data.test_csv={self.test_csv}, "
                f"e.g. {again[0]}: a test image must not be trained on"
            )
        return rows + test


def read_rows(path: Path, split: str | None = None) -> list[Row]:
    """The rows of one CSV, checked; `split` forces every row's split (data.test_csv). Every bad
    row is a problem, named with its line number (the header is line 1), in one error."""
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        missing = [name for name in ("path", "label") if name not in columns]
        if missing:
            raise UserError(
                f"{path} has no {' and no '.join(missing)} column (its header: {columns}); "
                "the first line must name the columns path and label (and optionally split)"
            )
        rows: list[Row] = []
        problems: list[str] = []
        first_line: dict[Path, int] = {}
        for values in reader:
            line = reader.line_num
            row = _row(values, path.parent, split, first_line)
            if isinstance(row, str):
                problems.append(f"line {line}: {row}")
                continue
            first_line[row.path] = line
            rows.append(row)
    if problems:
        more = len(problems) - _SHOWN_BAD_ROWS
        shown = "; ".join(problems[:_SHOWN_BAD_ROWS]) + (f"; and {more} more" if more > 0 else "")
        raise UserError(f"{path} has {len(problems)} rows that cannot be used: {shown}")
    if not rows:
        raise UserError(f"{path} lists no images: add rows of path,label under its header")
    return rows


def _row(
    values: dict[str, str | None], folder: Path, split: str | None, first_line: dict[Path, int]
) -> Row | str:
    """A row, or what is wrong with it; `first_line` holds the rows read so far."""
    text = (values.get("path") or "").strip()
    if not text:
        return "the path is empty"
    image = folder / Path(text).expanduser()
    labels = tuple(p.strip() for p in (values.get("label") or "").split(LABEL_SEPARATOR))
    labels = tuple(dict.fromkeys(label for label in labels if label))
    given_split = (values.get("split") or "").strip() or "train"
    if not labels:
        return f"{text} has an empty label"
    if split is None and given_split not in SPLITS:
        return f"{text} has split {given_split!r}, not one of {', '.join(SPLITS)} (or empty)"
    if not image.is_file():
        return f"{image} does not exist"
    earlier = first_line.get(image)
    if earlier is not None:
        return f"{text} is listed again (first on line {earlier})"
    return Row(image, labels, split or given_split)


def _classes(rows: Sequence[Row], multilabel: bool) -> tuple[list[str], bool]:
    """The sorted class names the rows use, and whether the labels are sets."""
    classes = sorted({label for row in rows for label in row.labels})
    return classes, multilabel or any(len(row.labels) > 1 for row in rows)


def _imageset(rows: Sequence[Row], classes: list[str], multilabel: bool) -> ImageSet | None:
    if not rows:
        return None
    index = {name: i for i, name in enumerate(classes)}
    if multilabel:
        labels = torch.zeros(len(rows), len(classes))
        for i, row in enumerate(rows):
            labels[i, [index[name] for name in row.labels]] = 1.0
    else:
        labels = torch.tensor([index[row.labels[0]] for row in rows], dtype=torch.long)
    return ImageSet([row.path for row in rows], labels, classes)
