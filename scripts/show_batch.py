"""Write one training batch, augmented and mixed as training would, to a PNG with class names:

    python scripts/show_batch.py data=fashion_mnist augment=randaugment out=batch.png

Every other argument is a train.py override (data.root=..., augment.mixup_alpha=0.2, ...).
out= (default batch.png), n= (images, default 32) and columns= (default 8) are this script's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from thaw.build import build_datamodule
from thaw.config import config_dir, script_arguments
from thaw.errors import UserError
from thaw.visualize import datamodule_batch_grid

OWN = {"out": "batch.png", "n": "32", "columns": "8"}


def main(argv: list[str]) -> Path:
    """Compose the train config from `argv`, draw one training batch, return the PNG's path."""
    own, overrides = script_arguments(argv, OWN)
    n, columns, out = (
        _positive("n", own["n"]),
        _positive("columns", own["columns"]),
        Path(own["out"]),
    )
    # One batch of n images, decoded in this process: starting loader workers costs more.
    overrides += [f"data.batch_size={n}", "data.num_workers=0"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if cfg.get("seed") is not None:
        torch.manual_seed(cfg.seed)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = datamodule.mix(next(iter(datamodule.train_dataloader())))
    grid = datamodule_batch_grid(datamodule, batch, n, columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def _positive(key: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(__doc__)
    print(main(sys.argv[1:]))
