"""`model.stem_stride`: how much the stem shrinks the image before the first block.

An ImageNet stem (a stride-2 conv, then a stride-2 max-pool in ResNets) turns a 28 px image into
7x7 before any block sees it. Small images learn better with less of that: 2 drops the max-pool,
1 also runs the first conv at stride 1. No weight changes shape, so pretrained weights still
load. A patchify stem (ConvNeXt's 4x4 stride-4 conv, a ViT's patch embedding) has no smaller
stride that keeps what its weights mean, and is refused.
"""

from __future__ import annotations

from torch import nn

from thaw.errors import UserError

STEM_STRIDES = (1, 2)


def set_stem_stride(model: nn.Module, stride: int, name: str) -> None:
    """Make `model`'s stem downsample by `stride` (1 or 2) instead of its own factor."""
    if stride not in STEM_STRIDES:
        raise UserError(f"model.stem_stride={stride!r} must be 1, 2 or null (the model's own)")
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.stride[0] != 2 or conv.kernel_size[0] <= conv.stride[0]:
        what = "no convolution" if conv is None else f"a {_describe(conv)} first convolution"
        raise UserError(
            f"model.stem_stride={stride} does not apply to {name}: its stem has {what}, not a "
            "stride-2 conv (ResNet, RegNet, EfficientNet, MobileNet stems are); use "
            "model.stem_stride=null"
        )
    pool = getattr(model, "maxpool", None)
    if isinstance(pool, nn.MaxPool2d):
        model.maxpool = nn.Identity()
    elif pool is not None and not isinstance(pool, nn.Identity):
        raise UserError(
            f"model.stem_stride={stride} does not apply to {name}: its stem pools with a "
            f"{type(pool).__name__}, not a max-pool; use model.stem_stride=null"
        )
    if stride == 1:
        conv.stride = (1, 1)


def _describe(conv: nn.Conv2d) -> str:
    kernel, stride = conv.kernel_size, conv.stride
    return f"{kernel[0]}x{kernel[1]} stride-{stride[0]}"
