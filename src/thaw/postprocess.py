"""Postprocessing: what turns a trained model's logits into its answer, saved beside its weights.

Preprocessing says how an image becomes the network's input; this says how the network's output
becomes an answer: the temperature fitted after training (Guo et al., 2017), the rule that
says "none of these" (thaw.openset), and for a multi-label model the per-label thresholds that
turn its sigmoid outputs into a set of labels. Like Preprocessing it travels in checkpoints and
exported files, so every consumer applies the same rule.
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
class Rejection:
    """The rule that says "none of these": an image whose `score` (thaw.openset.scores, higher
    means more like the training classes) is below `threshold` is of no known class, answered
    as `label` where the user asks to reject. The threshold lets `keep` of the known
    validation images pass. `k` and `bank_size` are the knn score's (0 for the others); what a
    feature score needs lives in the model's weights."""

    score: str
    threshold: float
    keep: float
    label: str = "unknown"
    k: int = 0
    bank_size: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.score, str) or not self.score:
            raise ValueError(f"rejection score must be a name, got {self.score!r}")
        if not 0 < self.keep < 1 or not math.isfinite(self.threshold):
            raise ValueError(
                f"rejection keep must be in (0, 1) and its threshold finite, got keep="
                f"{self.keep!r}, threshold={self.threshold!r}"
            )

    def known(self, scores: torch.Tensor) -> torch.Tensor:
        """True where a score passes the threshold."""
        return scores >= self.threshold


@dataclass(frozen=True)
class Postprocessing:
    """softmax(logits / temperature): 1.0 leaves the probabilities as the network gives them;
    and the rejection rule, where one was fitted (None: every image gets a known class).

    With `thresholds`, one per class, the model is multi-label: each class's probability is
    sigmoid(logit / temperature) on its own, and an image has every label whose probability
    reaches its threshold (0.5 until they are tuned on validation after training)."""

    temperature: float = 1.0
    rejection: Rejection | None = None
    thresholds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rejection, Mapping):
            rule = from_plain_values(Rejection, self.rejection, "postprocessing rejection")
            object.__setattr__(self, "rejection", rule)
        if self.thresholds is not None:
            values = tuple(self.thresholds)
            if not values or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1
                for t in values
            ):
                raise ValueError(
                    f"postprocessing thresholds must be numbers in [0, 1], got {self.thresholds!r}"
                )
            object.__setattr__(self, "thresholds", tuple(float(t) for t in values))
        value = self.temperature
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"postprocessing temperature must be a number > 0, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"postprocessing temperature must be a finite number > 0, got {value!r}"
            )
        object.__setattr__(self, "temperature", float(value))

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of logits (..., classes): a softmax, or each label's sigmoid."""
        scaled = logits / self.temperature
        return scaled.sigmoid() if self.multilabel else scaled.softmax(dim=-1)

    def label_sets(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Which labels each image has (bool, like `probabilities`): those at or above their
        thresholds. Only a multi-label model has label sets."""
        if self.thresholds is None:
            raise ValueError("a single-label model has no label thresholds")
        import torch  # here: see TYPE_CHECKING above

        cut = torch.tensor(self.thresholds, dtype=probabilities.dtype, device=probabilities.device)
        return probabilities >= cut

    def to_dict(self) -> dict[str, Any]:
        """Plain values, safe for `torch.load(weights_only=True)` and JSON."""
        values = dataclasses.asdict(self)
        if self.thresholds is None:  # a single-label record reads as it did before thresholds
            del values["thresholds"]
        else:
            values["thresholds"] = list(self.thresholds)
        return values

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
