"""Write sweep.md and sweep.csv (and an Optuna study's plots) for a multirun:
python scripts/sweep_report.py logs/train/multiruns/<time>   (or an hparams_search sweep dir)"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from thaw.errors import UserError
from thaw.search.sweep_report import write_sweep_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun's hydra.sweep.dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_sweep_report(args.sweep_dir)
    except UserError as err:
        parser.exit(2, f"sweep_report: {err}\n")


if __name__ == "__main__":
    main()
