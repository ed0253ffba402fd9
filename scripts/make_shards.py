"""Write litdata shards of a data set, for data=streaming:

    python scripts/make_shards.py data=imagefolder data.root=photos/ out=shards/
    python scripts/make_shards.py data=csv data.csv=labels.csv out=s3://bucket/shop-photos

Every other argument is a train.py override of the data group (data.image_size=224,
data.classes=[...], data.val_fraction=0.1, data.skip_bad_images=true, ...). The splits are planned
as training plans them, every image is decoded once, as data.cache decodes it, at the training
size, and each split is written with litdata.optimize to out/train, out/val and out/test, with
out/thaw_shards.json (class names, size, labels). Then train with
`python train.py data=streaming data.root=<out>`. workers= (default: the cores this process may
use) and chunk_bytes= (default 64MB) are this script's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from thaw import checks
from thaw.build import build_datamodule
from thaw.cli import exit_with, is_user_error
from thaw.config import config_dir, script_arguments
from thaw.data.sources.base import SPLITS
from thaw.data.sources.streaming import (
    FORMAT,
    check_output,
    is_remote,
    label_value,
    split_url,
    write_manifest,
    write_shards,
)
from thaw.data.verify import usable_cores
from thaw.errors import UserError

OWN = {"out": None, "workers": None, "chunk_bytes": "64MB"}


def main(argv: list[str]) -> str:
    """Compose the data group from `argv`, write the shards, return where they are."""
    own, overrides = script_arguments(argv, OWN)
    if not own["out"]:
        raise UserError("out= is required: a folder, or s3://bucket/prefix (out=shards/)")
    out = own["out"] if is_remote(own["out"]) else str(Path(own["out"]).resolve())
    check_output(out)
    workers = _workers(own["workers"])
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "semi=none"])
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    preprocessing = datamodule.preprocessing
    labels = {}
    for split in SPLITS:
        images = getattr(datamodule, f"{split}_set")
        if not is_remote(out):
            Path(out, split).mkdir(parents=True, exist_ok=True)
        write_shards(images, preprocessing, split_url(out, split), workers, own["chunk_bytes"])
        labels[split] = {"labels": [label_value(label) for label in images.labels]}
        print(f"{split}: {len(images)} images -> {split_url(out, split)}")
    write_manifest(
        out,
        {
            "format": FORMAT,
            "classes": datamodule.classes,
            "side": preprocessing.resize_size,
            "multilabel": datamodule.multilabel,
            "splits": labels,
        },
    )
    return out


def _workers(value: str | None) -> int:
    if value is None:
        return usable_cores()
    number = int(value) if value.isdigit() else value
    checks.integer("workers", number, 1)
    return number


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(__doc__)
    try:
        print(main(sys.argv[1:]))
    except Exception as err:
        if not is_user_error(err):
            raise
        exit_with(err)
