"""Where the API key comes from: the environment (THAW_API_KEY) or a file (api_key_file=<path>),
never the config. Hydra writes every command-line override and the composed config to the run's
.hydra/ in plain text, so `api_key=...` is refused before Hydra writes anything (KeepKeyOffDisk,
a Hydra callback of conf/serve.yaml) and again wherever a config is turned into settings.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from thaw.errors import UserError

ENV = "THAW_API_KEY"
WHERE = (
    f"give it in the environment ({ENV}=<key> python serve.py ...) or in a file only you can "
    "read (api_key_file=<path>)"
)


def refuse_key_in_config(cfg: DictConfig) -> None:
    """The key is not in the config: there it would be written to disk."""
    if cfg.get("api_key") is not None:
        raise UserError(
            "api_key= is refused: Hydra writes command-line overrides in plain text to the "
            f"run's .hydra/*.yaml, so the key would be on disk. Set api_key=null and {WHERE}"
        )


def api_key(cfg: DictConfig) -> str | None:
    """The key from THAW_API_KEY or from the file api_key_file (read now, surrounding
    whitespace stripped); None where neither is set: an open server."""
    refuse_key_in_config(cfg)
    path, value = cfg.get("api_key_file"), os.environ.get(ENV)
    if path is not None and value is not None:
        raise UserError(f"both {ENV} and api_key_file={path} give an API key: keep one")
    if path is not None:
        source, key = f"api_key_file={path}", _read(str(path))
    elif value is not None:
        source, key = ENV, value.strip()
    else:
        return None
    if not key:
        raise UserError(f"{source} holds an empty API key: put the key there, or {WHERE}")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise UserError(
            f"the API key in {source} holds whitespace or control characters, which the "
            "'Authorization: Bearer <key>' header cannot carry: use letters, digits and symbols"
        )
    return key


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise UserError(
            f"api_key_file={path} cannot be read ({reason}): give the path of a text file that "
            f"holds the key, or set {ENV} instead"
        ) from None


class KeepKeyOffDisk(Callback):
    """Refuses `api_key=` when a run starts, before Hydra writes the run's .hydra/ files. It
    exits itself (one paragraph, status 2): Hydra turns a callback's exception into a warning
    and goes on to write them."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_key_in(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_key_in(config)


def _exit_if_key_in(config: DictConfig) -> None:
    from thaw.cli import exit_with  # noqa: PLC0415 (the command line's, only where it runs)

    try:
        refuse_key_in_config(config)
    except UserError as err:
        exit_with(err)
