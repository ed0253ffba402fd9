"""Small fake datasets in the real on-disk formats, and a loopback HTTP server to serve them, so
the readers and the download path are tested without the internet or the real data; and what the
data tests share (normalisation statistics, class counts, the `loopback` fixture)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import pickle
import socket
import tarfile
import tempfile
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR10_FOLDER = "cifar-10-batches-py"

# The mean and std a test passes for the backbone's, where their values do not matter.
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.1]


def counts(labels: torch.Tensor) -> dict[int, int]:
    return dict(Counter(labels.tolist()))


@pytest.fixture(name="loopback")
def loopback_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `loopback` fixture: requests to 127.0.0.1 must not go through a proxy set in the
    environment. A test module that asks for it imports it (`from data_formats import
    loopback_fixture  # noqa: F401`); the other name keeps the argument from shadowing it."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def write_cifar_batch(path: Path, data: np.ndarray, labels: Sequence[int], name: str) -> None:
    """One CIFAR-10 batch pickle: `data` (N, 3072) uint8 rows (1024 R, 1024 G, 1024 B values, each
    plane row-major) under bytes keys, as the Python 2 originals have them."""
    batch = {
        b"batch_label": name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": np.ascontiguousarray(data, dtype=np.uint8),
        b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_cifar10(directory: Path, n_per_class: int, seed: int = 0) -> Path:
    """`directory/cifar-10-batches-py` with `n_per_class` random images of each class in train
    (spread over data_batch_1..5, shuffled) and in test_batch, plus batches.meta. Returns it."""
    rng = np.random.default_rng(seed)
    folder = Path(directory) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = rng.permutation(np.repeat(np.arange(10), n_per_class))
    for i, labels in enumerate(np.array_split(train_labels, 5), start=1):
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        write_cifar_batch(folder / f"data_batch_{i}", data, labels, f"training batch {i} of 5")
    test_labels = rng.permutation(np.repeat(np.arange(10), n_per_class))
    test_data = rng.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", test_data, test_labels, "testing batch 1 of 1")
    meta = {
        b"label_names": [name.encode() for name in CIFAR10_CLASSES],
        b"num_cases_per_batch": len(train_labels) // 5,
        b"num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def cifar10_archive(
    directory: Path, n_per_class: int = 2, seed: int = 0, name: str = "cifar-10-python.tar.gz"
) -> tuple[Path, str]:
    """The real archive layout (cifar-10-batches-py/ at the top) as `directory/name`; returns its
    path and md5."""
    archive = Path(directory) / name
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        folder = write_cifar10(Path(staging), n_per_class, seed)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname=CIFAR10_FOLDER)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of unsigned bytes (gzipped when `path` ends in .gz): magic 0x0000 08 <ndim>,
    each dimension as a big-endian uint32, then the data row-major."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(dim).to_bytes(4, "big") for dim in array.shape
    )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion_mnist(
    directory: Path, n_train: int, n_test: int, seed: int = 0, gzipped: bool = True
) -> Path:
    """The four Fashion-MNIST idx files with random 28x28 images and labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzipped else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)
    return directory


def write_image_folder(
    directory: Path,
    classes: Sequence[str],
    n_per_class: int,
    splits: Sequence[str] = ("train",),
    size: tuple[int, int] = (12, 10),
    suffix: str = ".png",
    seed: int = 0,
) -> Path:
    """`directory/<split>/<class>/img_<i><suffix>` random RGB images (the split "" puts the class
    folders directly in `directory`). Returns `directory`."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    for split in splits:
        for name in classes:
            folder = directory / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / f"img_{i}{suffix}")
    return directory


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep request lines out of the test output."""


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 (an ephemeral port) while the block runs; yields
    the base URL, ending in "/"."""
    with serve_handler(functools.partial(_QuietHandler, directory=str(directory))) as base:
        yield base + "/"


@contextmanager
def serve_handler(handler: Callable[..., http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve requests with `handler` on 127.0.0.1 (an ephemeral port) while the block runs;
    yields the base URL, without a trailing "/"."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (a port bound, then released): a fetch that fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
# words.txt and wnids.txt of a 4-class Tiny ImageNet, for write_tiny_imagenet.
WORDS = {
    "n01443537": "goldfish, Carassius auratus",
    "n02085620": "Chihuahua",
    "n02125311": "cougar, puma, catamount",
    "n03000000": "cougar",  # a second class named "cougar"
    "n09999999": "a WordNet entry that is not a class",
}
WNIDS = ["n03000000", "n01443537", "n02125311", "n02085620"]  # wnids.txt is not sorted


def write_tiny_imagenet(
    directory: Path,
    words: dict[str, str],
    wnids: Sequence[str],
    n_train: int,
    n_val: int,
    gray: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """`directory/tiny-imagenet-200` in the official layout: wnids.txt (in the given order),
    words.txt (every line of `words`: WordNet's has far more than the 200 classes),
    train/<wnid>/images/<wnid>_<i>.JPEG with <wnid>_boxes.txt beside images/,
    val/images/val_<i>.JPEG listed in shuffled order in val/val_annotations.txt, and an unlabelled
    test/images/.

    Every 64x64 image is one flat colour: class k's images have red = 40 * k + 20, so a decoded
    image tells its class; the classes in `gray` are saved as grayscale JPEGs (gray = red value).
    """
    rng = np.random.default_rng(seed)
    root = Path(directory) / TINY_IMAGENET_FOLDER
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    (root / "test" / "images").mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in wnids))
    (root / "words.txt").write_text("".join(f"{w}\t{names}\n" for w, names in words.items()))

    def save(path: Path, wnid: str) -> None:
        red = 40 * sorted(wnids).index(wnid) + 20
        if wnid in gray:
            Image.new("L", (64, 64), red).save(path, "JPEG", quality=95)
        else:
            Image.new("RGB", (64, 64), (red, int(rng.integers(0, 256)), 128)).save(
                path, "JPEG", quality=95
            )

    for wnid in wnids:
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            save(images / f"{wnid}_{i}.JPEG", wnid)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    val_wnids = [wnid for wnid in wnids for _ in range(n_val)]
    lines = []
    for i, wnid in enumerate(rng.permutation(val_wnids)):
        save(root / "val" / "images" / f"val_{i}.JPEG", str(wnid))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    Image.new("RGB", (64, 64)).save(root / "test" / "images" / "test_0.JPEG")
    return root


def tiny_imagenet_archive(directory: Path, **kwargs: object) -> tuple[Path, str]:
    """tiny-imagenet-200.zip with tiny-imagenet-200/ at the top, as published (`kwargs` go to
    write_tiny_imagenet); returns its path and md5."""
    archive = Path(directory) / f"{TINY_IMAGENET_FOLDER}.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        root = write_tiny_imagenet(Path(staging), **kwargs)  # type: ignore[arg-type]
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(root.rglob("*")):
                zf.write(path, path.relative_to(staging).as_posix())
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def write_exif_rotated_jpeg(path: Path, size: tuple[int, int] = (20, 10)) -> Path:
    """A JPEG stored `size` (width, height) wide, black with a red 4x4 block in its stored top-left
    corner, tagged with EXIF orientation 6 ("rotate 90 degrees clockwise to display"): upright it
    is height x width with the block in the top-right corner."""
    image = Image.new("RGB", size)
    image.paste((255, 0, 0), (0, 0, 4, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, "JPEG", quality=95, exif=exif)
    return path


def write_truncated_jpeg(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    """A JPEG cut off half-way, as an interrupted copy or download leaves it."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, "JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path
