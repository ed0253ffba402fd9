"""Out-of-fold probabilities: every image of the training pool scored by a model that never
trained on it, which is what cleanlab needs (its `pred_probs` must be out of sample).

The K runs are the run's own config with the K-fold of `data.folds`: run k trains on the other
folds and validates on fold k, and its best checkpoint (calibrated as the config says) scores
fold k. Each run has its own folder, `fold_<k>/`, and its scores are saved there as it ends, so
a rerun in the same run dir trains only the folds that had not finished (and resumes a cut-off
one from its last.ckpt).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from thaw.build import build_datamodule
from thaw.inference.predictor import Predictor, best_device
from thaw.models import load_trained
from thaw.train import run

log = logging.getLogger(__name__)

SCORES_FILE = "out_of_fold.pt"


@dataclass(frozen=True)
class OutOfFold:
    """The training pool, each image with its given label (`labels`, after data.relabel), the
    fold that held it out, and the probabilities (N, classes) of that fold's model. `keys` name
    the images as review CSVs do (a file's path, or an in-memory image's index); `pictures`
    are what a gallery shows (the file, or the uint8 image)."""

    keys: list[Path | int]
    pictures: list[Path | torch.Tensor]
    labels: torch.Tensor
    folds: torch.Tensor
    probabilities: torch.Tensor
    classes: list[str]


def fold_config(cfg: DictConfig, folds: int, fold: int, folder: Path) -> DictConfig:
    """The run's config as fold `fold` of `folds` in `folder`: validated on that fold, not
    tested (its images are scored instead) and without a rejection rule (it is never served),
    resumed from its own last.ckpt if one was cut off."""
    fold_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(fold_cfg):
        for key in ("folds", "filter_by", "rank_by"):
            fold_cfg.pop(key, None)
        fold_cfg.data.folds, fold_cfg.data.fold = folds, fold
        fold_cfg.paths.output_dir = str(folder)
        fold_cfg.test, fold_cfg.report = False, False
        fold_cfg.reject.score = None
        fold_cfg.ckpt_path = "auto"
    return fold_cfg


def out_of_fold(cfg: DictConfig, folds: int, output_dir: Path) -> OutOfFold:
    """Train (or reuse) the `folds` fold runs under `output_dir` and gather their scores."""
    parts = [fold_scores(cfg, folds, k, output_dir / f"fold_{k}") for k in range(folds)]
    keys: list[Path | int] = []
    pictures: list[Path | torch.Tensor] = []
    for part in parts:
        if part["images"] is None:  # files, named by path
            keys += [Path(name) for name in part["keys"]]
            pictures += [Path(name) for name in part["keys"]]
        else:
            keys += part["keys"]
            pictures += list(part["images"])
    return OutOfFold(
        keys=keys,
        pictures=pictures,
        labels=torch.cat([part["labels"] for part in parts]),
        folds=torch.cat([torch.full((len(p["keys"]),), k) for k, p in enumerate(parts)]),
        probabilities=torch.cat([part["probabilities"] for part in parts]),
        classes=parts[0]["classes"],
    )


def fold_scores(cfg: DictConfig, folds: int, fold: int, folder: Path) -> dict:
    """Fold `fold`'s held-out images scored by its best model: saved in `folder`, and read
    from there when that fold has finished before."""
    saved = folder / SCORES_FILE
    if saved.is_file():
        log.info("Fold %d of %d: scored before, reading %s", fold + 1, folds, saved)
        return torch.load(saved, weights_only=True)
    log.info("Fold %d of %d: training in %s", fold + 1, folds, folder)
    fold_cfg = fold_config(cfg, folds, fold, folder)
    run(fold_cfg)
    model = load_trained(folder / "checkpoints" / "best.ckpt")
    datamodule = build_datamodule(fold_cfg, model.preprocessing)
    datamodule.prepare_data()
    datamodule.setup("fit")
    held_out = datamodule.val_set
    assert held_out is not None  # K-fold always validates
    predictor = Predictor.from_trained([model], device=best_device("auto"))
    probabilities = torch.cat(
        [predictor.batch_probabilities([images]) for images, _ in datamodule.plain_loader("val")]
    )
    scores = {
        "keys": held_out.ids.tolist() if held_out.in_memory else [str(p) for p in held_out.images],
        "images": held_out.images.cpu() if held_out.in_memory else None,
        "labels": held_out.labels.cpu(),
        "probabilities": probabilities,
        "classes": model.classes,
    }
    torch.save(scores, saved)
    return scores
