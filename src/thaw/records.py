"""The plain-value records a checkpoint and an exported file carry (Preprocessing,
Postprocessing): read back strictly, so a key thaw does not know is an error, not ignored."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

R = TypeVar("R")


def from_plain_values(cls: type[R], values: Mapping[str, Any], name: str) -> R:
    """`cls(**values)` for the dataclass `cls`, once every key is one of its fields; `name`
    (e.g. "preprocessing") names the record in the error."""
    known = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {name} keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)
