"""`python fit_reject.py ckpt_path=...`: fit the rejection rule of a trained checkpoint without
training, on the splits it was trained with, and write it into the checkpoint."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from thaw.build import build_datamodule, trained_run_config
from thaw.errors import UserError
from thaw.inference.predictor import best_device
from thaw.models import load_trained
from thaw.openset.fit import RejectSettings, fit_rejection, store_rejection

log = logging.getLogger(__name__)


def task(cfg: DictConfig) -> None:
    """The command line's job (thaw.cli.fit_reject)."""
    settings = RejectSettings.of(cfg.reject)
    if settings.score is None:
        raise UserError(
            "reject.score=null fits no rule: choose a score, e.g. reject.score=mahalanobis"
        )
    device = best_device(cfg.device)
    network = load_trained(cfg.ckpt_path).to(device)
    if network.postprocessing.multilabel:
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} is a multi-label model: it needs no rejection rule, as an "
            "image of none of its labels gets an empty label set"
        )
    datamodule = build_datamodule(
        trained_run_config(network.config, cfg.data_root), network.preprocessing
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    if datamodule.val_set is None or len(datamodule.val_set) == 0:
        raise UserError(
            f"{cfg.ckpt_path} was trained without validation images, which the threshold is "
            "fitted on: train it again with data.val_fraction above 0"
        )
    val_batches = -(-len(datamodule.val_set) // datamodule.eval_batch_size)
    rule, score = fit_rejection(network, datamodule, settings, val_batches, device)
    store_rejection(cfg.ckpt_path, rule, score)
    log.info("Wrote the rejection rule into %s", cfg.ckpt_path)
