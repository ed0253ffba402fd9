"""Run several command lines through thaw's CLI entry functions in this one process, as
`python <app>.py args` would, and write each one's exit status and stderr as JSON:
    python tests/cli_batch.py <commands.json> <answers.json>
Each process spends seconds importing torch; the mistakes that get past the config share one.

A command with a "task" ("module:function", e.g. `cli_batch:refusing_task` below) runs that task
on its script's composed config (conf/<script>.yaml), as `thaw.cli.run_app` runs thaw's own."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from omegaconf import DictConfig

import thaw.cli
from thaw.errors import UserError

APPS = {"train": "train", "eval": "evaluate", "predict": "predict", "export": "export"}


def refusing_task(cfg: DictConfig) -> None:
    """A task that refuses a value it checked: a user error, however deep it is raised."""
    raise UserError(f"seed={cfg.seed} is refused by this task: give seed=<another>")


def failing_task(cfg: DictConfig) -> int:
    """A task whose operation fails with a plain ValueError: a bug, not the user's."""
    return int("x")


def answer(script: str, args: list[str], task: str | None = None) -> dict[str, object]:
    """The exit status (0 when the app returned) and stderr of `python <script>.py args` (with
    `task` in place of the app's own where given)."""
    sys.argv = [str(Path(__file__).resolve().parents[1] / f"{script}.py"), *args]
    stderr = io.StringIO()
    status: object = 0
    with contextlib.redirect_stderr(stderr):
        try:
            if task is None:
                getattr(thaw.cli, APPS[script])()
            else:
                thaw.cli.run_app(script, task)  # conf/<script>.yaml
        except SystemExit as exit_:
            status = exit_.code
    return {"returncode": status, "stderr": stderr.getvalue()}


if __name__ == "__main__":
    given, taken = map(Path, sys.argv[1:3])  # before answer() rewrites sys.argv
    commands = json.loads(given.read_text())
    answers = {name: answer(c["script"], c["args"], c.get("task")) for name, c in commands.items()}
    taken.write_text(json.dumps(answers))
