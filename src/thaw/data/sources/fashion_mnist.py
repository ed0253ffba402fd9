"""Fashion-MNIST from its idx files, read with our own parser.

The files may be gzipped (as published, and as Debian's `dataset-fashion-mnist` installs them) or
raw.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from thaw.data.sources.base import ImageSet, Splits
from thaw.data.sources.download import DataUnavailableError, download
from thaw.errors import UserError

log = logging.getLogger(__name__)

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# The published .gz files and their md5s (as torchvision lists them); only downloads are checked,
# because Debian recompresses the same data into files with other sums.
FILES = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_UBYTE = 0x08


class FashionMNIST:
    """Fashion-MNIST as uint8 tensors (N, 1, 28, 28): 60000 train, 10000 test, no validation split.

    The four idx files are looked for in `root`, then in `system_dir`; if neither has them all and
    `download` is true, the missing ones are fetched from `url` (a base URL; None: URL, the
    publisher's) into `root`.
    """

    def __init__(
        self,
        root: str | Path,
        download: bool = True,
        url: str | None = None,
        system_dir: str | Path | None = SYSTEM_DIR,
    ) -> None:
        self.root = Path(root)
        self.download = download
        url = url or URL
        self.url = url if url.endswith("/") else url + "/"
        self.system_dir = Path(system_dir) if system_dir else None

    def prepare(self) -> None:
        """Make sure the four files are in `root` or `system_dir`, else fetch them into `root`."""
        self._locate(FILES)

    def load(self) -> Splits:
        files = self._locate(FILES)
        log.info("Reading Fashion-MNIST from %s", files["train-images-idx3-ubyte"].parent)
        return Splits(
            train=_read_split(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"]),
            test=_read_split(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"]),
        )

    def load_test(self) -> ImageSet:
        files = self._locate(TEST_FILES)
        return _read_split(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"])

    def _locate(self, stems: Sequence[str]) -> dict[str, Path]:
        """The files `stems`, from the first directory holding them all; else download the ones
        `root` lacks."""
        for directory in (self.root, self.system_dir):
            found = _find_all(directory, stems) if directory is not None else None
            if found is not None:
                return found
        in_root = {stem: _find(self.root, stem) for stem in stems}
        missing = [f"{stem}.gz" for stem, path in in_root.items() if path is None]
        if not self.download:
            raise DataUnavailableError(self._unavailable("download is off", missing))
        files = {}
        for stem, path in in_root.items():
            if path is None:
                path = self.root / f"{stem}.gz"
                url = self.url + path.name
                try:
                    download(url, path, FILES[stem])
                except OSError as err:
                    raise DataUnavailableError(
                        self._unavailable(f"downloading {url} failed ({err})", missing)
                    ) from err
            files[stem] = path
        return files

    def _unavailable(self, reason: str, missing: list[str]) -> str:
        searched = f"{self.root}" + (f" and {self.system_dir}" if self.system_dir else "")
        return (
            f"Fashion-MNIST is missing from {searched} and {reason}. Install the Debian package "
            f"{APT_PACKAGE} (apt-get install {APT_PACKAGE}; it puts the files in {SYSTEM_DIR}), "
            f"or download {', '.join(missing)} from {self.url} and place them in {self.root}"
        )


def _find_all(directory: Path, stems: Sequence[str]) -> dict[str, Path] | None:
    """The files `stems` in `directory`, or None unless all are there."""
    found = {stem: _find(directory, stem) for stem in stems}
    if any(path is None for path in found.values()):
        return None
    return {stem: path for stem, path in found.items() if path is not None}


def _find(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Parse an idx file of unsigned bytes with `ndim` dimensions (gzipped if it ends in .gz).

    The header is a magic number (two zero bytes, the type code 0x08, the number of dimensions)
    followed by each dimension as a big-endian uint32; the data follows, row-major.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    expected = _IDX_UBYTE << 8 | ndim
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected:
        raise UserError(
            f"{path}: magic number {magic:#010x}, expected {expected:#010x} "
            f"(an idx file of {ndim}-d unsigned bytes)"
        )
    header = 4 + 4 * ndim
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = 1
    for dim in shape:
        size *= dim
    if len(raw) != header + size:
        raise UserError(
            f"{path}: header says shape {shape} ({size} bytes) but {len(raw) - header} bytes follow"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _read_split(images_path: Path, labels_path: Path) -> ImageSet:
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1).long()
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise UserError(f"{labels_path}: labels outside 0..{len(CLASSES) - 1}")
    return ImageSet(images.unsqueeze(1), labels, list(CLASSES))
