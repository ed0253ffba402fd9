"""`data.exclude` and `data.relabel`: a review's decisions (label_issues.csv, or a person's own
CSV) applied to the run's planned sets, so they change exactly the images they name: the
validation split, the folds and the few-shot draw stay those of the run without them (a fold
run of label_issues.py and the run trained on its review split alike).

A CSV names image files by `path` (relative paths are taken from `data.root`) and in-memory
images by `index`: the image's position in the source's own sets, its training set, then its
validation set, then its test set (see `number_images`), which is how label_issues.csv names
them. Relabel lists also have a `label` column, a class name of the run.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from thaw.data.sources.base import ImageSet
from thaw.errors import UserError

log = logging.getLogger(__name__)

_SHOWN = 5


@dataclass(frozen=True)
class ImageList:
    """The images one review CSV names (resolved paths, or pool indices), each with its new
    label where the list relabels."""

    setting: str  # "data.exclude=reviewed.csv", for messages
    paths: Mapping[Path, str | None]
    indices: Mapping[int, str | None]

    def __len__(self) -> int:
        return len(self.paths) + len(self.indices)

    @classmethod
    def read(cls, key: str, file: str | Path, root: str | Path | None, labelled: bool) -> ImageList:
        """The list in `file`, the value of `key` (data.exclude, data.relabel); `labelled`: rows
        need a `label`. Every problem is a UserError naming the file, the row and the fix."""
        setting = f"{key}={file}"
        path = Path(file)
        if not path.is_file():
            raise UserError(
                f"{setting}: no such file; give the path of a CSV (e.g. label_issues.csv)"
            )
        try:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                columns = set(reader.fieldnames or [])
        except (UnicodeDecodeError, csv.Error) as err:
            raise UserError(f"{setting}: not a readable CSV file ({err})") from None
        needed = " and a label column (a class name)" if labelled else ""
        if not rows or not ({"path", "index"} & columns) or (labelled and "label" not in columns):
            raise UserError(
                f"{setting}: the CSV needs a header row with a path column (image files) or an "
                f"index column (in-memory data sets){needed}, and one row per image; found "
                f"columns {sorted(columns)} and {len(rows)} rows"
            )
        paths: dict[Path, str | None] = {}
        indices: dict[int, str | None] = {}
        for number, row in enumerate(rows, start=2):
            label = (row.get("label") or "").strip() if labelled else None
            if labelled and not label:
                raise UserError(f"{setting}, line {number}: the label is empty; give a class name")
            named = (row.get("path") or "").strip()
            if named:
                image = Path(named).expanduser()
                if not image.is_absolute() and root is not None:
                    image = Path(root) / image
                paths[image.resolve()] = label
                continue
            index = (row.get("index") or "").strip()
            if not index.isdigit():
                raise UserError(
                    f"{setting}, line {number}: needs a path or an index (a whole number >= 0), "
                    f"got path={row.get('path')!r} index={row.get('index')!r}"
                )
            indices[int(index)] = label
        return cls(setting, paths, indices)


@dataclass(frozen=True)
class Corrections:
    """The exclude and relabel lists of a run (either may be None); `apply` also counts what
    each touched, for metrics.json."""

    exclude: ImageList | None
    relabel: ImageList | None

    @classmethod
    def read(cls, exclude: str | None, relabel: str | None, root: str | Path | None) -> Corrections:
        return cls(
            ImageList.read("data.exclude", exclude, root, False) if exclude else None,
            ImageList.read("data.relabel", relabel, root, True) if relabel else None,
        )

    def apply(
        self, sets: Mapping[str, ImageSet | None], by_index: bool = True
    ) -> tuple[dict[str, ImageSet | None], dict[str, int]]:
        """`sets` (by split name) without the excluded images and with the relabelled ones'
        new labels, and the counts {"data/excluded": n, "data/relabelled": m} of the lists that
        are set. `by_index` False (a test set read alone, whose indices are its own) matches
        files only, and a list none of whose images is there is then no error."""
        sets = dict(sets)
        counts: dict[str, int] = {}
        for name, images in (("relabelled", self.relabel), ("excluded", self.exclude)):
            if images is None:
                continue
            matched: set[Path | int] = set()
            for split, imageset in sets.items():
                if imageset is not None:
                    sets[split] = _corrected(imageset, images, by_index, matched)
            if by_index:
                _check_matched(images, matched)
            counts[f"data/{name}"] = len(matched)
            log.info("%s: %s %d images", images.setting, name, len(matched))
        return sets, counts


def number_images(
    train: ImageSet, val: ImageSet | None, test: ImageSet | None
) -> dict[str, ImageSet | None]:
    """A source's sets with every image numbered by its position in all of them, training set
    first, then validation, then test: the `index` a review list names an in-memory image by."""
    sets: dict[str, ImageSet | None] = {}
    start = 0
    for name, imageset in (("train", train), ("val", val), ("test", test)):
        if imageset is not None:
            ids = torch.arange(start, start + len(imageset))
            sets[name] = ImageSet(imageset.images, imageset.labels, imageset.classes, ids)
            start += len(imageset)
        else:
            sets[name] = None
    return sets


def _corrected(
    imageset: ImageSet, images: ImageList, by_index: bool, matched: set[Path | int]
) -> ImageSet:
    """`imageset` with `images` dropped (no labels) or relabelled, adding what matched."""
    if imageset.in_memory:
        keys: list[Path | int] = imageset.ids.tolist() if by_index else []
        wanted: Mapping[Path | int, str | None] = images.indices  # type: ignore[assignment]
    else:
        keys = [Path(p).resolve() for p in imageset.images]
        wanted = images.paths  # type: ignore[assignment]
    hits = [i for i, key in enumerate(keys) if key in wanted]
    if not hits:
        return imageset
    matched.update(keys[i] for i in hits)
    if all(wanted[keys[i]] is None for i in hits):  # an exclude list
        keep = torch.ones(len(imageset), dtype=torch.bool)
        keep[hits] = False
        return imageset.subset(keep.nonzero().flatten())
    labels = imageset.labels.clone()
    for i in hits:
        labels[i] = _label_of(wanted[keys[i]], imageset.classes, images.setting)  # type: ignore[arg-type]
    return ImageSet(imageset.images, labels, imageset.classes, imageset.ids)


def _label_of(name: str, classes: list[str], setting: str) -> int:
    if name not in classes:
        raise UserError(
            f"{setting}: label {name!r} is not a class of the data; the classes are {classes}"
        )
    return classes.index(name)


def _check_matched(images: ImageList, matched: set[Path | int]) -> None:
    """None of the list in the data is an error (the CSV of another data set, or a wrong
    data.root); some missing (files deleted since the review) a warning naming a few."""
    missing = [str(p) for p in images.paths if p not in matched]
    missing += [f"index {i}" for i in images.indices if i not in matched]
    if not matched:
        kind = "files" if images.paths else "indices"
        raise UserError(
            f"{images.setting}: none of its {len(images)} images is in the data (it names "
            f"{kind}, e.g. {missing[0]}): is it the list of another data set, or is data.root "
            "wrong?"
        )
    if missing:
        log.warning(
            "%s: %d of its images are not in the data, e.g. %s",
            images.setting,
            len(missing),
            ", ".join(missing[:_SHOWN]),
        )
