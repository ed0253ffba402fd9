"""Data beyond one disk (`data=streaming`): litdata shards that scripts/make_shards.py wrote, read
from a local folder or from object storage (`s3://bucket/prefix`; `local:/path` is a local folder
read as if it were remote, through litdata's chunk cache).

    <root>/thaw_shards.json      classes, the side S of the images, each split's labels
    <root>/<split>/index.json    litdata's index of the split's chunks (train, val, test)
    <root>/<split>/chunk-*.bin   the samples: "image" (3, S, S) uint8, "label"

Training streams the train split with litdata's StreamingDataset and StreamingDataLoader
(thaw.data.resumable.StreamingLoader): shuffled, split across DDP ranks and loader workers, and
resumable from the loader's state. Evaluation and the samples fitted after training read images
by index from the same shards, each image once, on every rank.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from collections.abc import Sequence
from functools import cached_property, partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from thaw.data.cache import fitted_image
from thaw.data.sources.base import SPLITS, ImageSet, Splits
from thaw.errors import UserError
from thaw.preprocess import Preprocessing

EXTRA = "streaming"  # pip install "thaw-vision[streaming]" brings litdata
MANIFEST = "thaw_shards.json"
FORMAT = 1
_REMOTE = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")


def require_litdata() -> ModuleType:
    try:
        import litdata
    except ImportError as err:
        raise UserError(
            f"data=streaming and scripts/make_shards.py need litdata, which is not installed: "
            f"pip install 'thaw-vision[{EXTRA}]'"
        ) from err
    return litdata


def split_url(root: str, split: str) -> str:
    """Where a split's shards are: below `root`, a folder or a URL."""
    return f"{root.rstrip('/')}/{split}" if is_remote(root) else str(Path(root) / split)


def is_remote(root: str) -> bool:
    return root.startswith(_REMOTE)


class Shards(Sequence[torch.Tensor]):
    """A split's shards as a sequence of (3, S, S) uint8 images, read by index (evaluation, a
    seeded sample), and the StreamingDataset that training streams; `positions` (a subset) are
    the samples it holds, in order. Each process opens the shards itself, lazily, so the value
    crosses to loader workers as a few strings."""

    def __init__(
        self,
        url: str,
        side: int,
        count: int,
        cache_dir: str | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        self.url, self.side, self.cache_dir = url, side, cache_dir
        self.whole = positions is None
        self.positions = torch.arange(count) if positions is None else positions
        self._opened: Any = None

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if self._opened is None:
            self._opened = self.dataset()
        sample = self._opened[int(self.positions[index])]
        return torch.from_numpy(np.asarray(sample["image"]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self), 3, self.side, self.side

    def subset(self, indices: torch.Tensor) -> Shards:
        return Shards(self.url, self.side, 0, self.cache_dir, self.positions[indices.cpu()])

    def dataset(self, shuffle: bool = False, seed: int = 0) -> Any:
        """litdata's StreamingDataset over every sample of the split."""
        litdata = require_litdata()
        # batch_decode: litdata's default ("auto") deserialises a window of neighbouring samples
        # for each one read, and a shuffled epoch uses one of them: many times the work.
        return litdata.StreamingDataset(
            self.url, cache_dir=self.cache_dir, shuffle=shuffle, seed=seed, batch_decode=False
        )

    def loader(self, batch_size: int, num_workers: int, seed: int) -> Any:
        """litdata's StreamingDataLoader over the whole split, shuffled by `seed` and the
        epoch."""
        if not self.whole:
            raise ValueError("only a whole split streams, not a subset of it")
        litdata = require_litdata()
        return litdata.StreamingDataLoader(
            self.dataset(shuffle=True, seed=seed),
            batch_size=batch_size,
            num_workers=num_workers,
            # Its own generator: a DataLoader without one draws its workers' base seed from the
            # global RNG at every iter(), and a resumed run would shift dropout by that draw.
            generator=torch.Generator().manual_seed(seed),
        )


class StreamingSource:
    """The shards below `root` (a folder, `s3://...`, `local:/path`); `cache_dir` is where litdata
    keeps the chunks it downloads from a remote root (null: litdata's default)."""

    def __init__(self, root: str, cache_dir: str | None = None) -> None:
        self.root = str(root)
        self.cache_dir = cache_dir

    def prepare(self) -> None:
        _ = self.manifest

    def load(self) -> Splits:
        sets = {split: self._split(split) for split in SPLITS}
        return Splits(train=sets["train"], val=sets["val"], test=sets["test"])

    def load_test(self) -> ImageSet:
        return self._split("test")

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """thaw_shards.json, fetched the way litdata fetches chunks where the root is remote."""
        try:
            if is_remote(self.root):
                text = _fetch_text(f"{self.root.rstrip('/')}/{MANIFEST}")
            else:
                text = (Path(self.root) / MANIFEST).read_text()
            manifest = json.loads(text)
        except (OSError, ValueError) as err:
            raise UserError(
                f"data.root={self.root}: no readable {MANIFEST} ({err}). data=streaming reads "
                "the shards of scripts/make_shards.py: write them with python "
                "scripts/make_shards.py data=imagefolder data.root=<photos> out=<shards>"
            ) from err
        if manifest.get("format") != FORMAT:
            raise UserError(
                f"data.root={self.root}: {MANIFEST} has format {manifest.get('format')!r}, this "
                f"thaw reads {FORMAT}: write the shards again with scripts/make_shards.py"
            )
        return manifest

    def _split(self, split: str) -> ImageSet:
        manifest = self.manifest
        classes, labels = manifest["classes"], manifest["splits"][split]["labels"]
        url = split_url(self.root, split)
        images = Shards(url, manifest["side"], len(labels), self.cache_dir)
        return ImageSet(images, label_tensor(labels, len(classes), manifest["multilabel"]), classes)


def label_tensor(labels: list[Any], classes: int, multilabel: bool) -> torch.Tensor:
    """Class indices (N,), or multi-hot rows (N, classes) from lists of indices."""
    if not multilabel:
        return torch.tensor(labels, dtype=torch.long)
    rows = torch.zeros(len(labels), classes)
    for row, indices in enumerate(labels):
        rows[row, indices] = 1.0
    return rows


def label_value(label: torch.Tensor) -> Any:
    """A label as a manifest stores it: an index, or a multi-hot row's indices."""
    return label.nonzero().flatten().tolist() if label.ndim else int(label)


def write_shards(
    images: ImageSet,
    preprocessing: Preprocessing,
    url: str,
    workers: int,
    chunk_bytes: str,
) -> None:
    """One split's shards, with litdata.optimize: each image decoded and fitted once
    (thaw.data.cache.fitted_image), in the set's order (each worker writes a slice in order), so
    the manifest's labels line up with the samples."""
    litdata = require_litdata()
    # optimize installs a SIGINT handler of its own and leaves it there: put the caller's back.
    previous = signal.getsignal(signal.SIGINT)
    try:
        litdata.optimize(
            fn=partial(_sample, images=images, preprocessing=preprocessing),
            inputs=list(range(len(images))),
            output_dir=url,
            chunk_bytes=chunk_bytes,
            num_workers=max(1, min(workers, len(images))),
            keep_data_ordered=True,
            mode="overwrite",
            # A forked worker starts at once; a spawned one imports torch and thaw again.
            start_method="fork" if sys.platform == "linux" else None,
            verbose=False,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def check_output(out: str) -> None:
    """Where shards can be written: a folder (`local:` too) or s3://, checked before any is."""
    if is_remote(out) and not out.startswith(("s3://", "local:")):
        raise UserError(f"out={out}: shards are written to a folder or to s3://bucket/prefix")


def write_manifest(out: str, manifest: dict[str, Any]) -> None:
    """thaw_shards.json beside the splits: a local file, or an object where `out` is s3://."""
    check_output(out)
    text = json.dumps(manifest)
    if not out.startswith("s3://"):
        (Path(out.removeprefix("local:")) / MANIFEST).write_text(text)
        return
    import boto3  # litdata's own dependency for s3

    bucket, _, prefix = out.removeprefix("s3://").partition("/")
    key = f"{prefix.rstrip('/')}/{MANIFEST}".lstrip("/")
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=text.encode())


def _sample(index: int, images: ImageSet, preprocessing: Preprocessing) -> dict[str, Any]:
    item = images.images[index]
    image = item if isinstance(item, torch.Tensor) else Path(item)
    label = images.labels[index]
    value = label.numpy().astype(np.float32) if images.multilabel else int(label)
    return {"image": fitted_image(image, preprocessing), "label": value}


def _fetch_text(url: str) -> str:
    """A small file from the remote root, through litdata's downloader for its scheme."""
    from litdata.streaming.downloader import get_downloader

    require_litdata()
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / MANIFEST
        get_downloader(url.rsplit("/", 1)[0], folder, []).download_file(url, str(local))
        return local.read_text()
