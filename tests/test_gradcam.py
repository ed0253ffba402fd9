"""Grad-CAM: on a model trained where the evidence is known it points at the evidence, for the
class asked; it runs on every registered backbone and leaves the model as it found it; and its
overlay paints only where the map is hot."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from classifiers import classifier
from thaw.analysis.gradcam import explain_image, grad_cam, overlay, target_layer
from thaw.models import ImageClassifier
from thaw.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, create_backbone
from thaw.models.backbones.torchvision import MODELS
from thaw.models.layer_groups import blocks_from_paths
from thaw.preprocess import Preprocessing

SIZE = 64  # the tiny backbone's stage4 map is 8 x 8 at this size
PATCH = 12
# The classes: a patch of one colour, anywhere; the rest of the image is gray noise.
COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
CLASSES = ["red", "green", "blue", "yellow"]
PREPROCESSING = Preprocessing(input_size=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: small convolutions on a busy 2-core machine are ~10x slower with
    two threads waiting on each other than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_backbone() -> Backbone:
    """A 4-stage CNN (strides 2, 2, 2, 1: 8 x 8 maps at 64 px, receptive field 31 px) that
    learns the task in seconds; a registered backbone from random init needs minutes of CPU at a
    size where its stride-32 stage4 map is spatial at all."""

    def block(inputs: int, outputs: int, stride: int) -> nn.Module:
        conv = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(outputs), nn.ReLU())

    stages = OrderedDict(
        stage1=block(3, 16, 2),
        stage2=block(16, 32, 2),
        stage3=block(32, 32, 2),
        stage4=block(32, 64, 1),
        pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    )
    model = nn.Sequential(stages)
    blocks = blocks_from_paths(model, {f"stage{i}": [f"stage{i}"] for i in range(1, 5)})
    return Backbone("tiny", model, 64, blocks, IMAGENET_MEAN, IMAGENET_STD)


def paint(image: torch.Tensor, colour: int, quadrant: int, g: torch.Generator) -> None:
    """A PATCH x PATCH square of COLOURS[colour] at a random place inside `quadrant` (0 top left,
    1 top right, 2 bottom left, 3 bottom right) of a (3, SIZE, SIZE) image in [0, 1]."""
    half = SIZE // 2
    top, left = ((quadrant // 2) * half, (quadrant % 2) * half)
    top += int(torch.randint(0, half - PATCH + 1, (1,), generator=g))
    left += int(torch.randint(0, half - PATCH + 1, (1,), generator=g))
    image[:, top : top + PATCH, left : left + PATCH] = COLOURS[colour].view(3, 1, 1)


def noise(n: int, g: torch.Generator) -> torch.Tensor:
    return (0.5 + 0.15 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def patches(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` images in [0, 1] with one patch each, their classes and the patches' quadrants."""
    images = noise(n, g)
    labels = torch.randint(0, 4, (n,), generator=g)
    quadrants = torch.randint(0, 4, (n,), generator=g)
    for image, label, quadrant in zip(images, labels.tolist(), quadrants.tolist(), strict=True):
        paint(image, label, quadrant, g)
    return images, labels, quadrants


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (images - mean.view(3, 1, 1)) / std.view(3, 1, 1)


def quadrant_share(cams: torch.Tensor, quadrants: torch.Tensor) -> torch.Tensor:
    """The fraction of each map's mass inside the given quadrant: 0.25 for a flat map, 0 for an
    all-zero one (no evidence found anywhere)."""
    half = SIZE // 2
    shares = []
    for cam, quadrant in zip(cams, quadrants.tolist(), strict=True):
        top, left = (quadrant // 2) * half, (quadrant % 2) * half
        mass = cam[top : top + half, left : left + half].sum()
        shares.append(mass / cam.sum().clamp(min=1e-12))
    return torch.stack(shares)


@pytest.fixture(scope="module")
def trained() -> ImageClassifier:
    """The tiny classifier trained on one-patch images (plain loop, CPU, a few seconds)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = classifier(tiny_backbone(), CLASSES, PREPROCESSING)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        images, labels, _ = patches(32, g)
        loss = nn.functional.cross_entropy(model(normalize(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_grad_cam_points_at_the_evidence_of_the_class_asked(trained):
    model = trained
    images, labels, quadrants = patches(64, torch.Generator().manual_seed(1))
    batch = normalize(images)
    with torch.no_grad():
        accuracy = (model(batch).argmax(dim=-1) == labels).float().mean()
    assert accuracy > 0.95  # it learned the task, so its evidence is the patch
    cams = grad_cam(model, batch, labels)
    assert cams.shape == (64, SIZE, SIZE)
    assert quadrant_share(cams, quadrants).mean() > 0.6  # a flat map gives 0.25

    # Two patches of different classes in one image: each class's map finds its own patch.
    g = torch.Generator().manual_seed(2)
    images = noise(32, g)
    pairs = [torch.randperm(4, generator=g)[:2] for _ in range(32)]
    places = [torch.randperm(4, generator=g)[:2] for _ in range(32)]
    for image, pair, place in zip(images, pairs, places, strict=True):
        for colour, quadrant in zip(pair.tolist(), place.tolist(), strict=True):
            paint(image, colour, quadrant, g)
    pairs, places = torch.stack(pairs), torch.stack(places)
    for k in (0, 1):
        cams = grad_cam(model, normalize(images), pairs[:, k])
        assert quadrant_share(cams, places[:, k]).mean() > 0.6, k


def test_explain_image_overlays_the_predicted_class_on_the_cropped_view(trained):
    images, labels, quadrants = patches(4, torch.Generator().manual_seed(3))
    half = SIZE // 2
    for image, label, quadrant in zip(images, labels.tolist(), quadrants.tolist(), strict=True):
        pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
        # Twice the size: the view is the model's 64 px input (resized), not the file.
        photo = Image.fromarray(pixels, "RGB").resize((2 * SIZE, 2 * SIZE), Image.NEAREST)
        explained, picture = explain_image(trained, photo, None)
        assert explained == label
        assert picture.size == (SIZE, SIZE) and picture.mode == "RGB"
        view = PREPROCESSING.transform(normalize=False)(photo).permute(1, 2, 0).numpy()
        change = np.abs(np.asarray(picture, dtype=np.float64) - view).sum(axis=-1)
        top, left = (quadrant // 2) * half, (quadrant % 2) * half
        assert change[top : top + half, left : left + half].sum() > 0.5 * change.sum()
        # A target other than the predicted class is explained as asked.
        assert explain_image(trained, photo, (label + 1) % 4)[0] == (label + 1) % 4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_grad_cam_runs_on_every_backbone_and_leaves_the_model_as_it_was(name):
    torch.manual_seed(0)
    model = classifier(create_backbone(name, weights=None), ["a", "b", "c"], PREPROCESSING)
    model.train()
    frozen_norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    frozen_norm.eval()  # as a fine-tuning run may keep frozen batch norms
    model.layer_groups()["stage1"].modules[0].requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    batch = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():  # as predict and the report run: gradients are needed anyway
        cams = grad_cam(model, batch, torch.tensor([0, 2]))
    assert cams.shape == (2, SIZE, SIZE) and cams.dtype == torch.float32
    assert torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    for cam in cams:  # each map is scaled by its own peak, or all zero
        assert cam.max() == pytest.approx(1.0) or cam.max() == 0
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # batch-norm statistics untouched: eval mode
        assert torch.equal(value, state[key]), key
    layer = target_layer(model)
    assert any(isinstance(m, nn.Conv2d) for m in layer.modules())


def test_the_target_layer_is_the_highest_spatial_map_that_can_point_somewhere():
    resnet = classifier(create_backbone("resnet18", weights=None), ["a", "b"], PREPROCESSING)
    assert target_layer(resnet, (224, 224)) is resnet.backbone.layer4  # 7x7
    assert target_layer(resnet, (128, 128)) is resnet.backbone.layer4  # 4x4
    assert target_layer(resnet) is resnet.backbone.layer3  # 64 px: layer4 would be 2x2
    assert target_layer(resnet, (28, 28)) is resnet.backbone.layer2  # layer3 2x2, layer2 4x4
    # MobileNetV3's stage4 ends in a pooled projection (a Linear): the map is the layer before.
    mobilenet = classifier(
        create_backbone("mobilenet_v3_large", weights=None), ["a", "b"], PREPROCESSING
    )
    assert target_layer(mobilenet, (224, 224)) is mobilenet.backbone.features[16]


def test_overlay_paints_where_the_map_is_hot_and_keeps_the_rest():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=g)
    photo = Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
    cam = torch.zeros(40, 50)
    cam[:20, :25] = 1.0  # hot top left, cold elsewhere
    painted = overlay(photo, cam)
    assert painted.size == (50, 40) and painted.mode == "RGB"
    before, after = np.asarray(photo, dtype=int), np.asarray(painted, dtype=int)
    assert (after[20:, :] == before[20:, :]).all() and (after[:, 25:] == before[:, 25:]).all()
    hot = np.abs(after[:20, :25] - before[:20, :25]).mean()
    assert hot > 20
    # alpha=1 gives the colour map's hottest colour (jet's dark red) where the map is 1.
    assert (np.asarray(overlay(photo, cam, alpha=1.0))[:20, :25] == [128, 0, 0]).all()
    assert np.array_equal(np.asarray(overlay(photo, cam, alpha=0.0)), before)
    # A uint8 tensor gives the same picture; a smaller map is resized to the image.
    assert np.array_equal(np.asarray(overlay(pixels, cam)), after)
    small = overlay(photo, torch.ones(5, 5))
    assert small.size == (50, 40) and (np.asarray(small) != before).any()
    with pytest.raises(ValueError, match="uint8"):
        overlay(pixels.float(), cam)
