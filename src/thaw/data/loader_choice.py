"""Which data path a run takes, decided once, by a pure function that also says why."""

from __future__ import annotations

from typing import NamedTuple

from thaw.data.augment.batch import check_batchable, unsupported
from thaw.data.augment.options import AugmentOptions
from thaw.errors import UserError

LOADERS = ("auto", "device", "dataloader")


class LoaderChoice(NamedTuple):
    """`path` is "device" (uint8 sets on the training device, whole batches augmented there) or
    "dataloader" (per-image transforms in workers); `reason` says why, for the log."""

    path: str
    reason: str


def choose_loader(requested: str, in_memory: bool, augment: AugmentOptions) -> LoaderChoice:
    """The path for `data.loader=requested` (one of LOADERS, checked with the data config):
    `auto` takes the device path when every split is held in memory and every augmentation runs
    on batches; an explicit `device` that cannot be honoured raises, naming the fix."""
    if requested == "device":
        if not in_memory:
            raise UserError(
                "data.loader=device needs a data set held in memory (cifar10, fashion_mnist, "
                "tiny_imagenet); image files stream from disk: use data.loader=dataloader"
            )
        check_batchable(augment)
        return LoaderChoice("device", "data.loader=device")
    if requested == "dataloader":
        return LoaderChoice("dataloader", "data.loader=dataloader")
    if not in_memory:
        return LoaderChoice("dataloader", "data.loader=auto: images are files")
    if per_image := unsupported(augment):
        why = f"data.loader=auto: {', '.join(per_image)} only per image"
        return LoaderChoice("dataloader", why)
    return LoaderChoice("device", "data.loader=auto: in memory, every augmentation batches")
