"""Fine-tuning: strategies, parameter groups, the freeze/unfreeze and EMA callbacks, schedules."""

from thaw.finetune.callback import FreezeUnfreeze
from thaw.finetune.ema import EMA
from thaw.finetune.feature_cache import FeatureCache, wants_cache
from thaw.finetune.param_groups import build_param_groups, discriminative_lrs, layer_decay_lrs
from thaw.finetune.strategies import FinetuneStrategy, Full, Gradual, LinearProbe, TwoPhase

__all__ = [
    "EMA",
    "FeatureCache",
    "FinetuneStrategy",
    "FreezeUnfreeze",
    "Full",
    "Gradual",
    "LinearProbe",
    "TwoPhase",
    "build_param_groups",
    "discriminative_lrs",
    "layer_decay_lrs",
    "wants_cache",
]
