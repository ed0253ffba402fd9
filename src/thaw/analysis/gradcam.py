"""Grad-CAM: where in the image the evidence for a class lies, as a heat map over the input.

Captum's LayerGradCam weights the channels of the backbone's last spatial feature map by the mean
gradient of the class logit, sums them and keeps the positive part; the map is then upsampled to
the input and scaled to [0, 1]. A model that looks at the background, a watermark or a border
instead of the object shows it here and nowhere in its accuracy.

Inference code (predict.py) imports this module, so it must not import training code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib import colormaps
from PIL import Image
from torch import nn

from thaw.models.network import ImageClassifier
from thaw.preprocess import Preprocessing

GROUPS = ("stage1", "stage2", "stage3", "stage4")  # the backbone's layer groups, lowest first
# The smallest map that localises within a quadrant; stage4 gives 7x7 at 224 px.
MIN_MAP_SIDE = 4
COLORMAP = "jet"  # the usual Grad-CAM colours: blue (cold) to red (hot)


def target_layer(model: ImageClassifier, input_size: tuple[int, int] | None = None) -> nn.Module:
    """The layer Grad-CAM weights: the last module that outputs a spatial map in the highest
    layer group (stage4 down to stage1) whose map is at least MIN_MAP_SIDE on each side for an
    input of `input_size` (None: the model's own input size).

    stage4's map is the standard choice, and at 224 px it is 7x7. At the small sizes shops and
    Fashion-MNIST use, stride 32 leaves stage4 a 1x1 map (28 px), which cannot point anywhere:
    then a lower group's map, coarser in meaning but still spatial, is used, and the report says
    which layer it was. A module counts as spatial when it holds a 2-D convolution; that skips
    what some backbones put after their last map (MobileNetV3's pooled 960 -> 1280 projection).
    A timm ViT has no such module: its layer is the last transformer block, whose input tokens
    (see `_token_cams`) are the grid of patches.
    """
    side = model.preprocessing.input_size
    groups = model.layer_groups()
    candidates = [m for g in reversed(GROUPS) if g in groups for m in reversed(groups[g].modules)]
    candidates = [m for m in candidates if any(isinstance(s, nn.Conv2d) for s in m.modules())]
    sizes = _map_sizes(model, candidates, input_size or (side, side))
    spatial = [module for module in candidates if module in sizes]
    if not spatial and _token_grid(model) is not None:
        return model.backbone.blocks[-1]
    if not spatial:
        raise ValueError(
            "no module of the backbone's layer groups gives a spatial feature map (B, C, h, w): "
            "Grad-CAM needs one, and a backbone of tokens (a ViT) has none"
        )
    for module in spatial:
        if min(sizes[module]) >= MIN_MAP_SIDE:
            return module
    return max(spatial, key=lambda module: min(sizes[module]))


def _map_sizes(
    model: ImageClassifier, modules: list[nn.Module], input_size: tuple[int, int]
) -> dict[nn.Module, tuple[int, int]]:
    """The (h, w) of each module's output for one input of `input_size` (one forward pass),
    for the modules whose output is a map (B, C, h, w)."""
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(module: nn.Module, inputs: object, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            sizes[module] = tuple(out.shape[-2:])

    hooks = [m.register_forward_hook(record) for m in modules]
    device = next(model.parameters()).device
    try:
        with _eval_mode(model), torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no batch-norm statistics updated, no dropout), then each module
    back in its own mode (a fine-tuning run may keep some batch norms in eval mode while the rest
    trains, so one model.train() would not restore it)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def grad_cam(model: ImageClassifier, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maps in [0, 1] at the input's resolution (batch is (N, 3, H, W) normalised input,
    targets (N,) class indices): Captum LayerGradCam on target_layer, ReLU'd, upsampled bilinearly
    to H x W, each map scaled by its own max (an all-zero map stays zero). The layer is
    `target_layer`'s for this input size.

    Gradients are taken with respect to the layer's output only (torch.autograd.grad), so no
    parameter gets a .grad and frozen parameters (requires_grad=False) need no change.
    """
    if batch.ndim != 4:
        raise ValueError(f"grad_cam needs a batch (N, C, H, W), got shape {tuple(batch.shape)}")
    targets = torch.as_tensor(targets).reshape(-1)
    if len(targets) != len(batch):
        raise ValueError(f"{len(batch)} images but {len(targets)} targets")
    height, width = batch.shape[-2:]
    layer = target_layer(model, (height, width))
    grid = _token_grid(model)
    # Autograd on even inside torch.inference_mode or no_grad (predict runs under both).
    with _eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        # A clone made here is an ordinary tensor even if `batch` was made under inference_mode.
        inputs = batch.detach().clone()
        if grid is not None and layer is model.backbone.blocks[-1]:
            cams = _token_cams(model, inputs, targets.to(inputs.device), layer, grid)
        else:
            cams = LayerGradCam(model, layer).attribute(
                inputs, target=[int(t) for t in targets], relu_attributions=True
            )
        if cams.ndim != 4:
            raise ValueError(
                f"the target layer {type(layer).__name__} gives maps of shape "
                f"{tuple(cams.shape)}, not (N, 1, h, w): Grad-CAM needs a spatial feature map"
            )
        cams = LayerAttribution.interpolate(cams.detach().float(), (height, width), "bilinear")
    cams = cams[:, 0].clamp(min=0)
    peaks = cams.amax(dim=(1, 2), keepdim=True)
    return torch.where(peaks > 0, cams / peaks.clamp(min=torch.finfo(cams.dtype).tiny), 0.0)


def _token_grid(model: ImageClassifier) -> tuple[int, int, int] | None:
    """(prefix tokens, rows, columns) of a timm ViT's token sequence, or None for other models."""
    backbone = model.backbone
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    blocks = getattr(backbone, "blocks", None)
    if grid is None or not isinstance(blocks, nn.Sequential) or not len(blocks):
        return None
    return getattr(backbone, "num_prefix_tokens", 0), *grid


def _token_cams(
    model: ImageClassifier,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    block: nn.Module,
    grid: tuple[int, int, int],
) -> torch.Tensor:
    """Grad-CAM on the patch tokens entering a ViT's last block, (N, 1, rows, columns): each
    channel weighted by the mean gradient of the class logit over the patches. Its input, not
    its output: after the last block only the class token reaches the head, so the patches'
    gradients there are zero (the reshape pytorch-grad-cam documents for ViTs)."""
    prefix, rows, columns = grid
    inputs = inputs.requires_grad_()  # the tokens need a graph even where the ViT is frozen
    seen: list[torch.Tensor] = []
    hook = block.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        logits = model(inputs)
    finally:
        hook.remove()
    (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), seen[0])
    tokens, grads = seen[0][:, prefix:], grads[:, prefix:]
    cams = (tokens * grads.mean(dim=1, keepdim=True)).sum(dim=-1).clamp(min=0)
    return cams.reshape(-1, 1, rows, columns).detach()


def overlay(
    image: Image.Image | torch.Tensor, cam: torch.Tensor, alpha: float = 0.5
) -> Image.Image:
    """The image (PIL RGB, or a uint8 (3, H, W) tensor) with the map as a colour heat map ('jet')
    blended on top, at the image's size (the cam is resized to it bilinearly).

    Each pixel mixes in the heat colour with weight `alpha * cam`: where the map is 0 the image is
    unchanged, so what the model ignored stays readable and only its evidence is painted.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"overlay takes a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}"
            )
        pixels = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    else:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    cam = cam.detach().float().cpu()
    if cam.ndim != 2:
        raise ValueError(f"overlay takes one map (h, w), got shape {tuple(cam.shape)}")
    if cam.shape != (height, width):
        cam = nn.functional.interpolate(cam[None, None], (height, width), mode="bilinear")[0, 0]
    weight = (alpha * cam.clamp(0, 1).numpy())[..., None]
    heat = colormaps[COLORMAP](cam.clamp(0, 1).numpy())[..., :3] * 255.0
    blended = (1.0 - weight) * pixels + weight * heat
    return Image.fromarray(np.clip(blended.round(), 0, 255).astype(np.uint8), "RGB")


def explain(
    model: ImageClassifier,
    preprocessing: Preprocessing,
    images: Sequence[Image.Image],
    targets: Sequence[int | None] | None = None,
    alpha: float = 0.5,
) -> list[tuple[int, Image.Image]]:
    """For each decoded image: the explained class (its target, or where that is None the class
    the model predicts) and the overlay of that class's map on the model's input view, the image
    after resize and centre crop (what the model saw, before normalisation)."""
    if not images:
        return []
    targets = [None] * len(images) if targets is None else list(targets)
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    device = next(model.parameters()).device
    views = preprocessing.transform(normalize=False)
    inputs = preprocessing.transform()
    batch = torch.stack([inputs(image) for image in images]).to(device)
    if any(target is None for target in targets):
        with torch.no_grad(), _eval_mode(model):
            predicted = model(batch).argmax(dim=-1).tolist()
        targets = [p if t is None else t for t, p in zip(targets, predicted, strict=True)]
    cams = grad_cam(model, batch, torch.tensor(targets)).cpu()
    return [
        (int(target), overlay(views(image), cam, alpha))
        for image, target, cam in zip(images, targets, cams, strict=True)
    ]


def explain_image(
    model: ImageClassifier, image: Image.Image, target: int | None = None
) -> tuple[int, Image.Image]:
    """The class explained (`target`, or the predicted class when None) and the overlay of its
    Grad-CAM on the model's cropped input view of `image`."""
    return explain(model, model.preprocessing, [image], [target])[0]
