"""Small fake datasets in the real on-disk formats, and a loopback HTTP server to serve them, so
the readers and the download path are tested without the internet or the real data."""

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
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
