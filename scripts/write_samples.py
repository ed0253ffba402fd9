"""Write a few real Fashion-MNIST test images as PNG files, named by their class, to try predict on.

python scripts/write_samples.py OUT_DIR [--per-class 2] [--classes Dress Coat ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from thaw.data.sources.fashion_mnist import CLASSES, SYSTEM_DIR, FashionMNIST


def write_samples(out: Path, classes: list[str], per_class: int, root: str) -> list[Path]:
    """The first `per_class` test images of each of `classes`, as out/<class>_<i>.png."""
    test = FashionMNIST(root, download=False, system_dir=SYSTEM_DIR).load_test()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in classes:
        images = test.images[test.labels == CLASSES.index(name)][:per_class]
        for i, image in enumerate(images):
            path = out / f"{name.replace('/', '_').replace(' ', '_')}_{i}.png"
            Image.fromarray(image[0].numpy(), "L").save(path)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--classes", nargs="+", default=CLASSES, choices=CLASSES)
    parser.add_argument("--data-root", default="data/fashion_mnist")
    args = parser.parse_args(argv)
    return write_samples(args.out, args.classes, args.per_class, args.data_root)


if __name__ == "__main__":
    print("\n".join(map(str, main())))
