"""Speed settings whose best value depends on the accelerator, resolved where the run happens.

`trainer.precision=auto` is bf16-mixed on a GPU that has bf16 (Ampere and later) and 32 elsewhere:
CPUs without AMX run bf16 slower than fp32. `trainer.channels_last=auto` is on for CUDA, whose
convolutions (cuDNN, tensor cores) want NHWC.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from thaw.errors import UserError
from thaw.noise import silence_known_noise

AUTO = "auto"
# Keys of the trainer group that thaw reads itself; pl.Trainer never sees them.
THAW_KEYS = ("channels_last",)


def uses_cuda(accelerator: str) -> bool:
    """Whether a trainer with this `accelerator` setting will run on a CUDA GPU."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


# float16 autocast: CUDA only. Lightning would quietly run bf16 on a CPU instead.
FLOAT16 = ("16-mixed", "16", "16-true", "half")


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """`trainer.precision` for this machine: auto resolved, float16 refused where no CUDA GPU
    will run it."""
    if str(precision) in FLOAT16 and not uses_cuda(accelerator):
        raise UserError(
            f"trainer.precision={precision} needs a CUDA GPU, and this run has none "
            f"(trainer.accelerator={accelerator}): use bf16-mixed, 32-true or auto"
        )
    if precision != AUTO:
        return precision
    # Emulated bf16 (pre-Ampere GPUs) is slower than fp32: only native bf16 counts.
    cuda = uses_cuda(accelerator) and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if cuda else "32-true"


def channels_last(trainer_cfg: DictConfig) -> bool:
    """`trainer.channels_last` (true, false or auto) for this machine."""
    value = trainer_cfg.get("channels_last", False)
    if value == AUTO:
        return uses_cuda(trainer_cfg.get("accelerator", "auto"))
    if not isinstance(value, bool):
        raise UserError(f"trainer.channels_last must be true, false or auto, got {value!r}")
    return value


def instantiate_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    """The pl.Trainer of the trainer group: thaw's own keys left out, `auto` values resolved,
    Lightning's known noise silenced."""
    silence_known_noise()
    settings = {k: v for k, v in trainer_cfg.items() if k not in THAW_KEYS}
    accelerator = kwargs.get("accelerator", settings.get("accelerator", "auto"))
    settings["precision"] = resolve_precision(settings.get("precision", 32), accelerator)
    return instantiate(settings, **kwargs)
