"""Pictures of what the model is fed: a grid of training images, after augmentation and mixing,
captioned with their class names. A wrong crop, a black border or a swapped label is obvious in a
picture and invisible in a loss curve; scripts/show_batch.py writes the grid to a PNG, BatchPreview
logs a run's first training batch to TensorBoard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.loggers import TensorBoardLogger

from thaw.data.datamodule import ImageDataModule
from thaw.errors import UserError
from thaw.semi.stream import SemiBatch

log = logging.getLogger(__name__)

CELL = 96  # width of each tile in pixels: small images are enlarged to read them, large shrunk
CAPTION = 14  # height of the caption strip under each tile
PAD = 2


def batch_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    soft_targets: torch.Tensor | None = None,
    columns: int = 8,
) -> Image.Image:
    """The normalised (N, 3, H, W) `images` un-normalised with `mean`/`std` and laid out in rows
    of `columns` tiles CELL pixels wide, each captioned with its class name; with `soft_targets`
    (a mixed batch) the caption also gives the share of the image's own class in its target.

    The grid is columns' * CELL + (columns' + 1) * PAD wide and rows * (tile height + CAPTION) +
    (rows + 1) * PAD high, where columns' = min(columns, N) and the tile height keeps the aspect.
    """
    if len(images) == 0:
        raise ValueError("batch_grid needs at least one image")
    images = images.detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = ((images * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8)
    height, width = images.shape[-2:]
    tile = (CELL, max(1, round(CELL * height / width)))
    resample = Image.Resampling.NEAREST if width < CELL else Image.Resampling.BILINEAR
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new(
        "RGB",
        (columns * CELL + (columns + 1) * PAD, rows * (tile[1] + CAPTION) + (rows + 1) * PAD),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, label) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        left = PAD + (i % columns) * (CELL + PAD)
        top = PAD + (i // columns) * (tile[1] + CAPTION + PAD)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").resize(tile, resample)
        grid.paste(picture, (left, top))
        caption = classes[label]
        if soft_targets is not None:
            caption += f" {float(soft_targets[i, label]):.0%}"
        draw.text((left + 1, top + tile[1]), _fit(caption, draw, font), fill="black", font=font)
    return grid


def _fit(
    text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
) -> str:
    """`text`, shortened with ".." until it fits a tile's width."""
    if draw.textlength(text, font=font) <= CELL - 2:
        return text
    while len(text) > 1 and draw.textlength(text + "..", font=font) > CELL - 2:
        text = text[:-1]
    return text + ".."


def datamodule_batch_grid(
    datamodule: ImageDataModule, batch: tuple, max_images: int, columns: int
) -> Image.Image:
    """A training batch as `datamodule` made it, captioned with its class names."""
    images, labels, *soft = (part[:max_images] for part in batch)
    return batch_grid(
        images,
        labels,
        datamodule.classes,
        datamodule.preprocessing.mean,
        datamodule.preprocessing.std,
        soft[0] if soft else None,
        columns,
    )


class BatchPreview(pl.Callback):
    """Log the first training batch of images of a run, as the model receives it (augmented,
    mixed), as an image grid to every TensorBoard logger, tag `train/batch_preview`. Of a
    semi-supervised batch, its labelled images."""

    def __init__(self, max_images: int = 32, columns: int = 8) -> None:
        if max_images < 1 or columns < 1:
            raise UserError(
                f"BatchPreview needs max_images >= 1 and columns >= 1, got {max_images}, {columns}"
            )
        self.max_images = max_images
        self.columns = columns
        self.done = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: tuple, batch_idx: int
    ) -> None:
        if isinstance(batch, SemiBatch):
            batch = batch.labelled
        if self.done or batch[0].ndim != 4:  # cached backbone features are no images to show
            return
        self.done = True
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ImageDataModule):
            log.warning("BatchPreview needs an ImageDataModule (for class names and statistics)")
            return
        grid = datamodule_batch_grid(datamodule, batch, self.max_images, self.columns)
        for logger in loggers:
            logger.experiment.add_image(
                "train/batch_preview", np.asarray(grid), trainer.global_step, dataformats="HWC"
            )
