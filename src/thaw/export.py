"""`python export.py ckpt_path=... format=onnx|onnx_int8|torch_export`: a trained model as a file
that runs without thaw, carrying its classes, preprocessing and postprocessing, written only if
it passes the parity gate on real images (see thaw.inference.parity)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from thaw import __version__, checks
from thaw.build import build_datamodule, trained_run_config
from thaw.checkpoint import file_identity, run_dir
from thaw.data.dataset import ImageDataset
from thaw.data.sources.base import ImageSet
from thaw.data.sources.imagefolder import ImageFolder
from thaw.data.splits import limit_per_class, select_classes, stratified_split
from thaw.inference.export_formats import (
    FILE_NAMES,
    INT8,
    OPSET,
    ExportError,
    check_format,
    load_exported,
    write_exported,
)
from thaw.inference.metadata import FLOAT_INPUT, UINT8_INPUT, ExportMetadata
from thaw.inference.parity import CheckImages, check_parity, rule_warning
from thaw.models import ImageClassifier, load_trained
from thaw.preprocess import Preprocessing
from thaw.progress import track

log = logging.getLogger(__name__)

RECORD = "export.json"
# Fewer INT8 calibration images than this get a warning: min/max calibration sets each
# activation's range from what it sees, and 100 is the default sample of Hugging Face Optimum's
# and Intel Neural Compressor's calibration.
MIN_CALIBRATION_IMAGES = 100


def export(cfg: DictConfig) -> Path:
    """Check the format, its tools and the output folder, load the checkpoint, export; returns
    the written file."""
    check_format(cfg.format)
    checkpoint = Path(cfg.ckpt_path)
    out_dir = Path(cfg.out) if cfg.out else run_dir(checkpoint)
    checks.writable("out", out_dir, folder=True)
    return export_model(
        load_trained(checkpoint),
        checkpoint,
        cfg.format,
        out_dir,
        data_root=cfg.data_root,
        images=cfg.images,
        normalize_in_graph=cfg.normalize_in_graph,
        calibration_images=cfg.calibration_images,
        parity_images=cfg.parity_images,
        opset=cfg.opset,
        seed=cfg.seed,
    )


def export_model(
    trained: ImageClassifier,
    checkpoint: Path,
    format: str,
    out_dir: str | Path,
    *,
    data_root: str | None = None,
    images: str | Path | None = None,
    normalize_in_graph: bool = False,
    calibration_images: int = 256,
    parity_images: int = 512,
    opset: int = OPSET,
    seed: int = 0,
) -> Path:
    """Export `trained` (the model of `checkpoint`) as `format` into `out_dir` (as model.onnx,
    model_int8.onnx or model.pt2) and record the gate's figures in its export.json. Calibration
    and checks use the run's training and validation images (read through its config, from
    `data_root` if they moved), or the class folders of `images`, drawn stratified with `seed`."""
    check_format(format)
    checks.integer("calibration_images", calibration_images, 1)
    checks.integer("parity_images", parity_images, 1)
    checks.writable("out", out_dir, folder=True)
    layout = UINT8_INPUT if normalize_in_graph else FLOAT_INPUT
    metadata = ExportMetadata(
        trained.classes,
        trained.preprocessing,
        trained.postprocessing,
        layout,
        file_identity(checkpoint),
    )
    pools = image_pools(trained, checkpoint, data_root, images)
    calibration_pool, check_pool, images_from = pools
    check = check_images(
        stratified_sample(check_pool, parity_images, seed), trained.preprocessing, layout
    )
    calibration = None
    notes: dict[str, Any] = {"model": trained.config["model"]["name"], "images_from": images_from}
    if format == INT8:
        chosen = stratified_sample(calibration_pool, calibration_images, seed)
        notes.update(calibration_notes(len(chosen)))
        calibration = load_images(chosen, trained.preprocessing, normalize=not normalize_in_graph)
    return write_gated(
        format, trained, trained, metadata, Path(out_dir), check, calibration, opset, notes
    )


def calibration_notes(count: int) -> dict[str, Any]:
    """export.json's record of the INT8 calibration, with a warning (logged too) where `count`
    images are too few to trust the activation ranges."""
    if count >= MIN_CALIBRATION_IMAGES:
        return {"calibration_images": count}
    warning = (
        f"INT8 calibration on {count} images, fewer than {MIN_CALIBRATION_IMAGES}: the "
        "activation ranges may miss what real inputs reach, and accuracy drop on them beyond "
        "what the parity gate sees. Raise calibration_images, or give more training images "
        "with images=<folder of class folders>"
    )
    log.warning(warning)
    return {"calibration_images": count, "warnings": [warning]}


def write_gated(
    format: str,
    model: nn.Module,
    reference: nn.Module,
    metadata: ExportMetadata,
    out_dir: Path,
    check: CheckImages,
    calibration: torch.Tensor | None = None,
    opset: int = OPSET,
    notes: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as `format`, compare it with `reference` (the checkpoint's model) on
    `check`, and only if it passes move it into `out_dir` and record the figures. It is written
    to a temporary folder first, so a refused export leaves nothing, not even half a file."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / FILE_NAMES[format]
        log.info("Exporting to %s", format)
        write_exported(format, model, metadata, staged, calibration, opset)
        log.info("Checking it against the checkpoint on %d images", len(check.labels))
        figures = check_parity(reference, load_exported(staged), check, quantized=format == INT8)
        warning = rule_warning(figures) if format == INT8 else None
        if warning:
            log.warning(warning)
            notes = {**(notes or {})}
            notes["warnings"] = [*notes.get("warnings", []), warning]
        out_dir.mkdir(parents=True, exist_ok=True)
        path = Path(shutil.move(staged, out_dir / staged.name))
    record = {
        "format": format,
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "input_layout": metadata.input_layout,
        **({} if format == "torch_export" else {"opset": opset}),
        **figures,
        **(notes or {}),
        "thaw_version": __version__,
        "source_checkpoint": metadata.source_checkpoint,
    }
    write_record(out_dir / RECORD, record)
    log.info("Wrote %s (%d bytes): %s", path, record["size_bytes"], figures)
    return path


def write_record(path: Path, record: dict[str, Any]) -> None:
    """export.json maps each exported file's name to its record, so exporting several formats
    into one run dir keeps every record."""
    records = json.loads(path.read_text()) if path.is_file() else {}
    records[record["file"]] = record
    path.write_text(json.dumps(records, indent=2) + "\n")


def image_pools(
    trained: ImageClassifier, checkpoint: Path, data_root: str | None, images: str | Path | None
) -> tuple[ImageSet, ImageSet, str]:
    """(calibration pool, check pool, where they came from): the run's training and validation
    splits, as its config split them; or an image folder's train/ and val/ (its class folders
    alone serve both when it has no val/)."""
    if images:
        splits = ImageFolder(images).load()
        _check_classes(trained, checkpoint, splits.train.classes, f"images={images}")
        pools = [
            select_classes(s, trained.classes) for s in (splits.train, splits.val or splits.train)
        ]
        return pools[0], pools[1], str(images)
    train_cfg = trained_run_config(trained.config, data_root)
    datamodule = build_datamodule(train_cfg, trained.preprocessing)
    datamodule.prepare_data()
    datamodule.setup("fit")
    _check_classes(
        trained,
        checkpoint,
        datamodule.classes,
        "the run's data (point data_root at it if it moved)",
    )
    if datamodule.val_set is None or len(datamodule.val_set) == 0:
        raise ExportError(
            f"the run of {checkpoint} has no validation images to check the export on "
            "(data.val_fraction=0): give a folder of class folders with images=<folder>"
        )
    return datamodule.train_set, datamodule.val_set, "validation split of the run"


def _check_classes(
    trained: ImageClassifier, checkpoint: Path, found: list[str], where: str
) -> None:
    if sorted(found) != sorted(trained.classes):
        raise ExportError(
            f"{checkpoint} was trained on classes {trained.classes}, but {where} has "
            f"{found}: calibrate and check on images of the model's own classes"
        )


def stratified_sample(imageset: ImageSet, n: int, seed: int) -> ImageSet:
    """At most `n` images, the same number from every class (as far as each has them), drawn
    with `seed`: calibration and checks see every class, and the same images every time. Of a
    multi-label set: `n` images with each label's share, by iterative stratification."""
    if not imageset.multilabel:
        return limit_per_class(imageset, max(1, n // len(imageset.classes)), seed)
    if len(imageset) <= n:
        return imageset
    return imageset.subset(stratified_split(imageset.labels, n / len(imageset), seed)[1])


def load_images(
    imageset: ImageSet, preprocessing: Preprocessing, normalize: bool = True
) -> torch.Tensor:
    """The images through the evaluation transform: normalised float, or with
    `normalize=False` the uint8 RGB crop a graph that normalises itself takes."""
    dataset = ImageDataset(
        imageset, preprocessing.transform(normalize=normalize), preprocessing.resize_size
    )
    read = (dataset[i][0] for i in range(len(dataset)))
    return torch.stack(list(track(read, "Reading images", total=len(dataset))))


def check_images(imageset: ImageSet, preprocessing: Preprocessing, layout: str) -> CheckImages:
    """The gate's images, for the checkpoint and laid out as the exported graph takes them."""
    reference = load_images(imageset, preprocessing)
    exported = reference if layout == FLOAT_INPUT else load_images(imageset, preprocessing, False)
    return CheckImages(reference, exported, imageset.labels)


def task(cfg: DictConfig) -> None:
    """The command line's job (thaw.cli.export)."""
    path = export(cfg)
    record = json.loads((path.parent / RECORD).read_text())[path.name]
    print(OmegaConf.to_yaml({"export": record, "path": str(path)}))
