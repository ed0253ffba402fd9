"""The unlabeled pool of semi=fixmatch: the training images whose labels the split plan hid
(data.unlabeled_per_class), and image files, data.unlabeled_root (a folder, searched at any
depth) and data.unlabeled (a .txt list), checked to decode like training folders, without the
labelled run's own images."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from thaw.data.settings import DataSettings
from thaw.data.sources.base import ImageSet
from thaw.data.sources.imagefolder import image_files, read_image_list
from thaw.data.splits import join
from thaw.data.verify import verify_files
from thaw.errors import UserError

log = logging.getLogger(__name__)

_SHOWN = 5


def unlabeled_pool(
    settings: DataSettings,
    hidden: ImageSet | None,
    labelled: Sequence[ImageSet | None],
    decode_size: int | None,
) -> tuple[ImageSet, dict[str, int]]:
    """The pool the data settings name, from the `hidden` images of the plan and the files, and
    its counts for metrics.json ("data/unlabeled", and "data/unlabeled_skipped" for files).
    `labelled` are the run's train, validation and test sets, which no pool image may be."""
    named = [
        f"data.{key}={value}"
        for key, value in (
            ("unlabeled_root", settings.unlabeled_root),
            ("unlabeled", settings.unlabeled),
            ("unlabeled_per_class", settings.splits.unlabeled_per_class),
        )
        if value is not None
    ]
    if not named:
        raise UserError(
            "semi=fixmatch needs unlabeled images: data.unlabeled_root=<folder>, "
            "data.unlabeled=<list.txt>, or for an in-memory data set "
            "data.unlabeled_per_class=N (with data.samples_per_class)"
        )
    pools = [hidden] if hidden is not None and len(hidden) else []
    counts: dict[str, int] = {}
    if settings.unlabeled_root is not None or settings.unlabeled is not None:
        present = [imageset for imageset in labelled if imageset is not None]
        files = [Path(p) for s in present if not s.in_memory for p in s.images]  # type: ignore[union-attr]
        pool, counts["data/unlabeled_skipped"] = read_unlabeled(
            settings.unlabeled_root, settings.unlabeled, present[0].classes, files, decode_size
        )
        pools.append(pool)
    if not pools:
        raise UserError(f"{', '.join(named)}: no image is left over for the unlabeled pool")
    if len({pool.in_memory for pool in pools}) > 1:
        raise UserError(
            f"{', '.join(named)}: an in-memory data set's hidden labels and image files "
            "cannot make one pool; use data.unlabeled_per_class or the files"
        )
    pool = pools[0] if len(pools) == 1 else join(*pools)
    counts["data/unlabeled"] = len(pool)
    log.info("Unlabeled pool: %d images (%s)", len(pool), ", ".join(named))
    return pool, counts


def read_unlabeled(
    root: str | None,
    listing: str | None,
    classes: list[str],
    labelled: Iterable[Path],
    decode_size: int | None,
) -> tuple[ImageSet, int]:
    """The pool's files as an ImageSet (labels -1), and how many were skipped because they do
    not decode (or are missing): in a catalogue of thousands a few bad files are expected, so
    they are left out and named in the log rather than stopping the run. Files of the labelled
    sets (`labelled`: train, validation and test) are left out too, so that no validation or
    test image is ever trained on."""
    files: list[Path] = []
    if root is not None:
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.unlabeled_root={root}: no such folder; give a folder of images")
        files += image_files(folder)
    if listing is not None:
        path = Path(listing).expanduser()
        if not path.is_file():
            raise UserError(
                f"data.unlabeled={listing}: no such file; give a .txt list of image paths, one "
                "per line (relative ones from the list's folder)"
            )
        files += read_image_list(path)
    seen = {p.resolve() for p in labelled}
    unique = list(dict.fromkeys(files))
    kept = [p for p in unique if p.resolve() not in seen]
    if len(kept) < len(unique):
        log.info("Unlabeled pool: left out %d files of the labelled sets", len(unique) - len(kept))
    bad = verify_files(kept, decode_size).bad if kept else {}
    if bad:
        shown = ", ".join(f"{path} ({why})" for path, why in list(bad.items())[:_SHOWN])
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        log.warning("Skipped %d unlabeled files that do not decode: %s%s", len(bad), shown, more)
        kept = [p for p in kept if p not in bad]
    if not kept:
        given = " and ".join(
            f"{key}={value}"
            for key, value in (("data.unlabeled_root", root), ("data.unlabeled", listing))
            if value is not None
        )
        raise UserError(f"{given}: no image that decodes, outside the labelled sets")
    labels = torch.full((len(kept),), -1, dtype=torch.long)
    return ImageSet(kept, labels, classes), len(bad)
