"""Print a predictions.csv (from predict.py) as a table: python scripts/show_predictions.py CSV"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from thaw.renderings import text_table

COLUMNS = ("path", "label", "prob", "top2_label", "top2_prob", "error")


def show(path: Path) -> str:
    """The file name, the top label with its probability, the runner-up, and any error."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    table = [("file", "label", "prob", "second", "prob", "error")]
    for row in rows:
        cells = [row.get(column) or "" for column in COLUMNS]
        cells[0] = Path(cells[0]).name
        table.append(
            tuple(f"{float(c):.4f}" if i in (2, 4) and c else c for i, c in enumerate(cells))
        )
    return text_table(table)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(show(Path(sys.argv[1])))
