"""Progress that shows wherever the output goes: a rich bar on a terminal, and plain log lines in
a file (a SLURM log, `> run.log`), where a bar shows nothing until the end.

Lines go through the `thaw.progress` logger, so Hydra also writes them to the run's log file.
This module is what inference needs (a loop's `track`); the training loop's callbacks are in
thaw.progress.trainer, which imports Lightning.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import track as rich_track

log = logging.getLogger(__name__)
T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stdout is an interactive terminal (not a file, pipe or cluster log)."""
    return sys.stdout.isatty()


def track(items: Iterable[T], description: str, total: int, every: int = 0) -> Iterator[T]:
    """`items`, with a bar on a terminal, else a log line every `every` items (default: about
    every tenth of `total`) and one at the end, with the rate."""
    if on_terminal():
        yield from rich_track(items, description, total=total)
        return
    every = every or max(1, total // 10)
    started = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        if done % every == 0 or done == total:
            rate = done / max(time.perf_counter() - started, 1e-9)
            log.info("%s: %d/%d (%.1f/s)", description, done, total, rate)


def duration(seconds: float) -> str:
    """`1h02m`, `4m05s`, `12s`: short enough for a log line; `?` when not known."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
