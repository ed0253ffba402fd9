"""Postprocessing: what turns a trained model's logits into its answer, saved beside its weights.

Preprocessing says how an image becomes the network's input; this says how the network's output
becomes probabilities. Today that is the temperature fitted after training (Guo et al., 2017);
like Preprocessing it travels in checkpoints and exported files, so every consumer applies the
same rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from thaw.records import from_plain_values

if TYPE_CHECKING:  # not imported: the sweep report reads run records before torch is needed
    import torch


@dataclass(frozen=True)
class Postprocessing:
    """softmax(logits / temperature): 1.0 leaves the probabilities as the network gives them."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        value = self.temperature
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"postprocessing temperature must be a number > 0, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"postprocessing temperature must be a finite number > 0, got {value!r}"
            )
        object.__setattr__(self, "temperature", float(value))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of logits (..., classes)."""
        return (logits / self.temperature).softmax(dim=-1)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, safe for `torch.load(weights_only=True)` and JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Postprocessing:
        return from_plain_values(cls, values, "postprocessing")


def split_legacy_preprocessing(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(preprocessing, postprocessing) values from a preprocessing record written before the
    temperature moved out of it (checkpoints and exported files of thaw before the
    post-processing record): the temperature was a field of the preprocessing."""
    preprocessing = dict(values)
    postprocessing = {}
    if "temperature" in preprocessing:
        postprocessing["temperature"] = preprocessing.pop("temperature")
    return preprocessing, postprocessing
