"""The `augment` config group, validated once into typed options, so a typo or an out-of-range value
fails before any data is read rather than in a loader worker mid-epoch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from thaw import checks
from thaw.errors import UserError

POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")
AUTOAUGMENT_POLICIES = ("imagenet", "cifar10", "svhn")
# Random erasing's rectangle, on both paths (torchvision's defaults): its share of the image's area
# and its aspect ratio, each drawn uniformly (the ratio on a log scale).
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)

# Numeric keys: (lowest, highest, must be an integer).
_RANGES: dict[str, tuple[float, float, bool]] = {
    "crop_padding": (0.0, 1.0, False),
    "hflip": (0.0, 1.0, False),
    "color_jitter": (0.0, math.inf, False),
    "num_ops": (1, 14, True),
    "magnitude": (0, 30, True),
    "random_erasing": (0.0, 1.0, False),
    "mixup_alpha": (0.0, math.inf, False),
    "cutmix_alpha": (0.0, math.inf, False),
    "mix_prob": (0.0, 1.0, False),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "policy": POLICIES,
    "autoaugment_policy": AUTOAUGMENT_POLICIES,
}


@dataclass(frozen=True)
class AugmentOptions:
    """What the augment group switches on; every default is off.

    Per image (training only): `crop_padding` (padded random crop, fraction of the side), `hflip`
    (probability), `policy` (an automatic augmentation: randaugment with `num_ops` and `magnitude`
    of 0..30, trivialaugment, or autoaugment with `autoaugment_policy`), `color_jitter` (strength),
    then `random_erasing` (probability) on the normalised tensor. Per batch: MixUp (`mixup_alpha`)
    and/or CutMix (`cutmix_alpha`), one of them chosen at random for a batch when both are on,
    applied to a batch with probability `mix_prob`.
    """

    crop_padding: float = 0.0
    hflip: float = 0.0
    color_jitter: float = 0.0
    policy: str = "none"
    num_ops: int = 2
    magnitude: int = 9
    autoaugment_policy: str = "imagenet"
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0

    @property
    def random_keys(self) -> list[str]:
        """'key=value' for each augmentation switched on: empty when training images go through
        the same deterministic transform as evaluation images."""
        on = {
            "crop_padding": self.crop_padding > 0,
            "hflip": self.hflip > 0,
            "policy": self.policy != "none",
            "color_jitter": self.color_jitter > 0,
            "random_erasing": self.random_erasing > 0,
            "mixup_alpha": self.mixes_batches and self.mixup_alpha > 0,
            "cutmix_alpha": self.mixes_batches and self.cutmix_alpha > 0,
        }
        return [f"{key}={getattr(self, key)}" for key, switched_on in on.items() if switched_on]

    @property
    def mixes_batches(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @classmethod
    def parse(
        cls, augment: AugmentOptions | Mapping[str, Any] | None, group: str = "augment"
    ) -> AugmentOptions:
        """Options from the augment config (missing keys off); unknown keys and bad values raise
        ValueError naming the key (under `group`, e.g. semi.strong), the value and what is
        allowed."""
        if isinstance(augment, AugmentOptions):
            return augment
        given = dict(augment or {})
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise UserError(f"unknown {group} keys {unknown}; known keys: {known}")
        if given.get("policy") is None:
            given.pop("policy", None)
        values = {key: _check(f"{group}.{key}", key, value) for key, value in given.items()}
        return cls(**values)


def _check(name: str, key: str, value: Any) -> Any:
    """`value` of augment key `key` (`name` in messages), checked against its choices or range
    (a float where the key is a number)."""
    if key in _CHOICES:
        checks.choice(name, value, _CHOICES[key])
        return value
    low, high, integer = _RANGES[key]
    maximum = None if high == math.inf else high
    if integer:
        checks.integer(name, value, int(low), maximum=maximum and int(maximum))
        return value
    checks.number(name, value, low, maximum=maximum)
    return float(value)
