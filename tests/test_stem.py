"""model.stem_stride: less downsampling in the stem for small images, with the same weights."""

from __future__ import annotations

import pytest
import torch

from thaw.models import create_backbone

SIZE = 32


def first_block_input(name: str, stem_stride: int | None, weights: str | None = None) -> tuple:
    """The side of the map the first block receives for a SIZE px image, and the backbone."""
    backbone = create_backbone(name, weights, input_size=SIZE, stem_stride=stem_stride)
    model = backbone.model.eval()
    block = model.layer1 if name.startswith("resnet") else model.features[1]
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    with torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    return seen[0], backbone


@pytest.mark.parametrize(
    ("name", "sides"),
    [("resnet18", {None: 8, 2: 16, 1: 32}), ("mobilenet_v3_large", {None: 16, 2: 16, 1: 32})],
)
def test_stem_stride_sets_the_first_blocks_resolution_and_keeps_the_weights(name, sides, tmp_path):
    torch.manual_seed(0)
    saved = create_backbone(name, None).model.state_dict()
    torch.save(saved, tmp_path / "weights.pth")
    for stride, side in sides.items():
        got, backbone = first_block_input(name, stride, str(tmp_path / "weights.pth"))
        assert got == side, (stride, got)
        loaded = backbone.model.state_dict()
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_a_patchify_stem_is_refused_by_name():
    with pytest.raises(ValueError, match=r"convnext_atto: its stem has a 4x4 stride-4"):
        create_backbone("convnext_atto", None, "timm", SIZE, stem_stride=1)
    with pytest.raises(ValueError, match=r"stem_stride=3 must be 1, 2 or null"):
        create_backbone("resnet18", None, stem_stride=3)
