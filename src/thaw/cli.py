"""Running a Hydra app the way a user (or a cluster log) wants its errors: a mistake in what the
user gave ends in one paragraph on stderr and exit status 2; a bug keeps its traceback and exit 1.

Which is which is told by the exception's type alone (`is_user_error`): a *user error* is a
`thaw.errors.UserError` (what thaw's own checks raise about a config value, a path, an input
file, a missing optional extra; every exception class thaw defines for bad input subclasses it),
one of the library errors named in `LIBRARY_USER_ERRORS` (Hydra's config errors, a mandatory
value left out), or a config's `_target_` that refused the arguments the config gave it (see
`is_user_error`). Anything else, even a ValueError that thaw or torch raised, is unexpected.
`HYDRA_FULL_ERROR=1` shows every traceback, as in any Hydra app.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
)

from thaw.errors import UserError

FULL_ERROR = "HYDRA_FULL_ERROR"
USER_ERROR_EXIT = 2
# The errors of libraries that are always about what the user gave, never a bug of thaw's:
LIBRARY_USER_ERRORS: tuple[type[BaseException], ...] = (
    # Hydra's config errors: a config key or option that does not exist, an override it cannot
    # parse, a config that does not compose (OverrideParseException, MissingConfigException,
    # ConfigCompositionException, ...). InstantiationException is one too, but it is the user's
    # only as `is_user_error` says.
    HydraException,
    # A value left out (`???`) that the run reads, and an interpolation `${...}` to one.
    MissingMandatoryValue,
    InterpolationToMissingValueError,
)
# What a `_target_` raises when it refuses the arguments the config gave it: Python's own
# TypeError where keywords do not bind (`optimizer.lrr=0.1`) or a value has the wrong type, and
# the ValueError of a constructor's check of a value (torch's `Invalid learning rate: -1.0`).
ARGUMENT_REFUSALS: tuple[type[BaseException], ...] = (ValueError, TypeError)
_FULL_KEY = re.compile(r"full_key: (\S+)")
_MISSING = re.compile(r"Missing mandatory value: ?([\w.\[\]/-]+)")


def train() -> None:
    """`python train.py`, `thaw-train`."""
    run_app("train", "thaw.train:task")


def evaluate() -> None:
    """`python eval.py`, `thaw-eval`."""
    run_app("eval", "thaw.evaluate:task")


def predict() -> None:
    """`python predict.py`, `thaw-predict`."""
    run_app("predict", "thaw.predict:task")


def export() -> None:
    """`python export.py`, `thaw-export`."""
    run_app("export", "thaw.export:task")


def fit_reject() -> None:
    """`python fit_reject.py`, `thaw-fit-reject`."""
    run_app("fit_reject", "thaw.fit_reject:task")


def label_issues() -> None:
    """`python label_issues.py`, `thaw-label-issues`."""
    run_app("label_issues", "thaw.label_issues:task")


def acquire() -> None:
    """`python acquire.py`, `thaw-acquire`."""
    run_app("acquire", "thaw.acquire:task")


def serve() -> None:
    """`python serve.py`, `thaw-serve`."""
    run_app("serve", "thaw.serve:task")


def run_app(config_name: str, task_path: str) -> None:
    """`hydra.main` for conf/<config_name>.yaml and the task at `task_path` ("module:function"),
    with user errors as one paragraph. The task's module (torch, Lightning) is imported only once
    the config has composed, so a config mistake is reported in a second.

    Hydra prints its own (shortened) traceback for anything a task raises, and its config errors
    span several lines; so while composing, Hydra is told to re-raise (`HYDRA_FULL_ERROR`), and
    the task reports its own user errors. The user's own setting is restored before the task
    runs, so processes it starts (DDP ranks, jobs) see what the user set."""
    from thaw.config import config_dir  # noqa: PLC0415 (light; kept beside its only use)

    users_setting = os.environ.get(FULL_ERROR)
    show_all = users_setting == "1"
    os.environ[FULL_ERROR] = "1"

    module, _, name = task_path.partition(":")

    def job(cfg: DictConfig) -> Any:
        _restore(users_setting)
        try:
            # A value left out (`???`) that another refers to: found now, not after the imports.
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            task: Callable[[DictConfig], Any] = getattr(importlib.import_module(module), name)
            return task(cfg)
        except Exception as err:
            if show_all or not is_user_error(err):
                raise
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                # One job of a sweep: said as one paragraph, then left to the launcher, which
                # records the job as failed (the Optuna search goes on to the next trial).
                print(f"Error: {describe(err)}", file=sys.stderr)
                raise
            exit_with(err)

    job.__module__ = module  # Hydra names the job (its log file, train.log) after it

    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(
            job
        )()
    except Exception as err:  # raised while composing, before the task ran
        if show_all or not is_user_error(err):
            raise
        exit_with(err)
    finally:
        _restore(users_setting)


def _restore(users_setting: str | None) -> None:
    if users_setting is None:
        os.environ.pop(FULL_ERROR, None)
    else:
        os.environ[FULL_ERROR] = users_setting


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is about what the user gave, by its type: a UserError (thaw's checks, and
    every exception class thaw defines for bad input), one of LIBRARY_USER_ERRORS, or an
    InstantiationException that is the user's.

    Hydra raises an InstantiationException for a config node it cannot instantiate: with no
    cause where Hydra refused the node itself (a `_target_` that is not callable, `_args_` that
    are no list), and otherwise from what locating the `_target_` or calling it with the
    config's arguments raised. That is the user's when the cause is a user error, or one of
    ARGUMENT_REFUSALS: those are how a constructor (or Python, binding the keywords) refuses its
    arguments, and the arguments are the config's values. So a ValueError that an operation
    deep inside a target's constructor raised is taken for the user's too: the message still
    names the config key, and HYDRA_FULL_ERROR=1 shows the traceback. Any other cause (an
    AttributeError, a KeyError, a RuntimeError, an ImportError of a `_target_` that does not
    import) is a bug, with its traceback.
    """
    if isinstance(err, InstantiationException):
        cause = err.__cause__
        return cause is None or isinstance(cause, ARGUMENT_REFUSALS) or is_user_error(cause)
    return isinstance(err, (UserError, *LIBRARY_USER_ERRORS))


def exit_with(err: BaseException) -> NoReturn:
    """Print `err` as one paragraph on stderr and exit with status 2."""
    print(f"Error: {describe(err)}", file=sys.stderr)
    print(f"(Set {FULL_ERROR}=1 to see the traceback.)", file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT) from None


def describe(err: BaseException) -> str:
    """The message of a user error, without tracebacks, Hydra's search path or OmegaConf's
    node details, and with the closest valid names where a name was wrong."""
    cause = err.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        return _unknown_key(cause, str(err))
    if isinstance(err, MissingConfigException) and err.options:
        return _unknown_option(err)
    if isinstance(err, OverrideParseException):
        return _bad_override(str(err))
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        found = _FULL_KEY.search(str(err))
        where = f"{found.group(1)}: " if found else ""
        return where + describe(err.__cause__)
    text = str(err)
    missing = _MISSING.search(text)
    if isinstance(err, MissingMandatoryValue | InterpolationToMissingValueError) and missing:
        key = missing.group(1)
        return f"{key} has no value (??? in the config): give one, e.g. {key}=<value>"
    return _last_message(text, type(err).__name__)


def _unknown_key(cause: ConfigAttributeError | ConfigKeyError, text: str) -> str:
    key, full_key = str(cause.key), str(cause.full_key)
    parent = cause.parent_node
    valid = [str(k) for k in parent.keys() if k != "hydra"] if parent is not None else []
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    prefix = full_key[: -len(key)]
    hint = f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    add = text.split("use ", 1)[1].strip() if "use +" in text else f"+{full_key}=<value>"
    return (
        f"{full_key} is not a config key.{hint} (`--cfg job` prints every key; {add} adds a new "
        "one.)"
    )


def _unknown_option(err: MissingConfigException) -> str:
    missing = str(err.missing_cfg_file or "")
    group, _, option = missing.rpartition("/")
    options = [str(o) for o in err.options or ()]
    close = difflib.get_close_matches(option, options, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(f'{group}={c}' for c in close)}?" if close else ""
    return f"{group}={option} is not an option.{hint} The options of {group}: {', '.join(options)}."


def _bad_override(text: str) -> str:
    """Which command-line override Hydra could not parse, with its parser's words."""
    parser = OverridesParser.create()
    for arg in get_args_parser().parse_known_args()[0].overrides:
        try:
            parser.parse_override(arg)
        except HydraException:
            reason, _, see = text.partition("\nSee ")
            return f"cannot read the override {arg!r}: {reason.strip()}. See {see.strip()}"
    return text


def _last_message(text: str, name: str) -> str:
    """The error's own words: for an error re-raised from a DataLoader worker, whose message
    holds the worker's traceback, the text after its last `Name: ` (or `module.Name: `)."""
    if "Original Traceback" in text:
        found = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}: ", text, re.MULTILINE))
        if found:
            text = text[found[-1].end() :]
    return text.split("\nConfig search path:")[0].strip()
