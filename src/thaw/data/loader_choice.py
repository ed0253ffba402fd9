"""Which data path a run takes, decided once, by a pure function that also says why."""

from __future__ import annotations

from typing import NamedTuple

from thaw.data.augment.batch import check_batchable, unsupported
from thaw.data.augment.options import AugmentOptions
from thaw.errors import UserError

LOADERS = ("auto", "device", "dataloader")


class LoaderChoice(NamedTuple):
    """`path` is "device" (uint8 sets on the training device, whole batches augmented there),
    "dataloader" (per-image transforms in workers) or "streaming" (litdata shards, batches
    augmented on the device); `reason` says why, for the log."""

    path: str
    reason: str


def choose_loader(
    requested: str,
    in_memory: bool,
    augment: AugmentOptions,
    cached: bool = False,
    streamed: bool = False,
) -> LoaderChoice:
    """The path for `data.loader=requested` (one of LOADERS, checked with the data config):
    `auto` takes the device path when every split is held in memory (or decoded into data.cache:
    `cached`) and every augmentation runs on batches; an explicit `device` that cannot be
    honoured raises, naming the fix. Streamed shards (data=streaming) take the streaming path:
    litdata's loader, batches augmented on the device."""
    if streamed:
        if requested == "dataloader":
            raise UserError(
                "data=streaming streams shards and augments whole batches: leave data.loader "
                "at auto (or device)"
            )
        check_batchable(augment)
        return LoaderChoice("streaming", "data=streaming: litdata shards, batches on the device")
    held = "decoded into data.cache" if cached else "in memory"
    if requested == "device":
        if not in_memory:
            raise UserError(
                "data.loader=device needs a data set held in memory (cifar10, fashion_mnist, "
                "tiny_imagenet) or decoded once with data.cache=true; image files are decoded "
                "per image: add data.cache=true, or use data.loader=dataloader"
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
    return LoaderChoice("device", f"data.loader=auto: {held}, every augmentation batches")
