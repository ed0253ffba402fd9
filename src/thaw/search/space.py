"""Hydra override ranges (`interval(1e-4, 1e-2)`, `tag(log, interval(...))`, `choice(a, b)`,
`range(0, 4)`) as Optuna distributions, and a trial's sampled values back as overrides."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override: `interval` is continuous (log-scaled
    with the `log` tag; integer when both ends are ints, as `int(interval(1, 8))` makes them),
    `range` is a stepped int or float range over the values Hydra would sweep, `choice` is
    categorical."""
    value = override.value()
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    if override.is_range_sweep() and not value.shuffle:
        assert isinstance(value, RangeSweep)
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values) and isinstance(value.step, int):
            return IntDistribution(values[0], values[-1], step=value.step)
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))


def search_space(
    params: Mapping[str, Any], arguments: Sequence[str]
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """(the distributions to sample, the fixed overrides every trial gets) from the preset's
    `params` and the command line: a sweep on the command line (`a=1,2`) joins the search
    space, a fixed value there overrides the preset's range for that key."""
    parser = OverridesParser.create()
    params = flat(params)
    given = parser.parse_overrides(list(arguments))
    fixed_keys = {o.get_key_element() for o in given if not o.is_sweep_override()}
    fixed = [o.input_line for o in given if not o.is_sweep_override()]
    preset = parser.parse_overrides([f"{key}={value}" for key, value in params.items()])
    space: dict[str, BaseDistribution] = {}
    for override in [*preset, *(o for o in given if o.is_sweep_override())]:
        key = override.get_key_element()
        if key in fixed_keys:
            continue
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`params` with nested keys joined by dots: a preset writes `optimizer.lr: ...` as one key,
    the command line (`hydra.sweeper.params.optimizer.lr=...`) nests it; the later one wins."""
    joined: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            joined.update(flat(value, f"{name}."))
        else:
            joined.pop(name, None)
            joined[name] = value
    return joined


def as_overrides(params: Mapping[str, Any]) -> list[str]:
    """A trial's sampled values as command-line overrides (`key=value`)."""
    return [f"{key}={_literal(value)}" for key, value in params.items()]


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)
