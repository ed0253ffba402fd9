"""Run several command lines through thaw's CLI entry functions in this one process, as
`python <app>.py args` would, and write each one's exit status and stderr as JSON:
    python tests/cli_batch.py <commands.json> <answers.json>
Each process spends seconds importing torch; the mistakes that get past the config share one."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import thaw.cli

APPS = {"train": "train", "eval": "evaluate", "predict": "predict", "export": "export"}


def answer(script: str, args: list[str]) -> dict[str, object]:
    """The exit status (0 when the app returned) and stderr of `python <script>.py args`."""
    sys.argv = [str(Path(__file__).resolve().parents[1] / f"{script}.py"), *args]
    stderr = io.StringIO()
    status: object = 0
    with contextlib.redirect_stderr(stderr):
        try:
            getattr(thaw.cli, APPS[script])()
        except SystemExit as exit_:
            status = exit_.code
    return {"returncode": status, "stderr": stderr.getvalue()}


if __name__ == "__main__":
    given, taken = map(Path, sys.argv[1:3])  # before answer() rewrites sys.argv
    commands = json.loads(given.read_text())
    answers = {name: answer(c["script"], c["args"]) for name, c in commands.items()}
    taken.write_text(json.dumps(answers))
