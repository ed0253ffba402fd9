"""What checking that every image decodes costs at setup, measured side by side on this machine.

    python scripts/bench_verify_images.py --images 5000 --out results/verify_images

Writes --images JPEGs (real Fashion-MNIST photos, upscaled to --side pixels as a shop's product
shots are larger than their thumbnails) and checks them with thaw.data.verify: serially and on
every core with an empty cache, then again with the cache filled. Prints one table and writes
<out>/verify.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from thaw.data.sources.fashion_mnist import FashionMNIST
from thaw.data.verify import verify_files
from thaw.renderings import markdown_table


def write_photos(folder: Path, count: int, side: int) -> list[Path]:
    pixels = FashionMNIST(folder / "fmnist").load().train.images[:count]
    paths = []
    for i, image in enumerate(pixels):
        path = folder / f"{i:05d}.jpg"
        photo = Image.fromarray(image[0].numpy()).resize((side, side))
        photo.convert("RGB").save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--decode-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("results/verify_images"))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), args.images, args.side)
        rows = []
        cases = [
            ("serial, empty cache", 1, "serial"),
            (f"{cores} processes, empty cache", cores, "parallel"),
            (f"{cores} processes, cache filled", cores, "parallel"),
        ]
        for name, workers, cache in cases:
            start = time.perf_counter()
            found = verify_files(paths, args.decode_size, workers, Path(tmp) / f"{cache}.sqlite")
            seconds = time.perf_counter() - start
            rows.append(
                [name, str(found.decoded), f"{seconds:.2f}", f"{len(paths) / seconds:,.0f}"]
            )
    table = markdown_table([["check", "decoded", "seconds", "images/s"], *rows])
    heading = f"{args.images} JPEGs of {args.side}x{args.side}, decoded at >= {args.decode_size}"
    text = f"{heading}, {cores} cores\n\n{table}\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verify.md").write_text(text)


if __name__ == "__main__":
    main()
