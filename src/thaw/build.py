"""Builders: the pieces of a run from its composed config, for the entry points and scripts."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher

from thaw.analysis.thresholds import UNTUNED
from thaw.checkpoint_io import DurableCheckpointIO
from thaw.data.datamodule import ImageDataModule
from thaw.errors import UserError
from thaw.finetune import FeatureCache, FinetuneStrategy, FreezeUnfreeze, wants_cache
from thaw.finetune.distillation import Distillation
from thaw.hardware import channels_last, instantiate_trainer
from thaw.models import backbone_spec, build_model, load_trained
from thaw.models.backbones import BackboneSpec
from thaw.models.loss import resolve_class_weights
from thaw.models.task import ClassificationTask
from thaw.postprocess import Postprocessing
from thaw.preprocess import Preprocessing
from thaw.progress.trainer import with_progress
from thaw.resume import ResumeState
from thaw.semi import FixMatch, WarmupCheck


def trained_run_config(config: dict[str, Any], data_root: str | None) -> DictConfig:
    """The config of the run that trained a checkpoint, its data read from `data_root` when one
    is given: from there only (no system copy, no download), so a data_root without the data is
    an error that names it, not a quiet read of another copy."""
    run_cfg = OmegaConf.create(config)
    if data_root:
        # The saved config is resolved: the source holds its own copy of data.root.
        run_cfg.data.root = run_cfg.data.source.root = data_root
        for key, value in (("system_dir", None), ("download", False)):
            if key in run_cfg.data.source:
                run_cfg.data.source[key] = value
    return run_cfg


def build_datamodule(
    cfg: DictConfig, preprocessing: Preprocessing | None = None, test_only: bool = False
) -> ImageDataModule:
    """The DataModule of `cfg.data`. Without `preprocessing` it resolves the run's own at setup
    (the backbone's statistics, or the data's with `data.normalize=dataset`); a trained model's
    `preprocessing` is used as it is, and `test_only` then reads only its test images. Only a
    run of its own (no `preprocessing`) trains, so only it reads semi=fixmatch's unlabeled
    pool."""
    spec = model_spec(cfg.model)
    size = {"image_size": spec.input_size} if cfg.data.get("image_size") == "auto" else {}
    # Partial, then called: a setting it refuses raises its own error, not Hydra's wrapper.
    settings = instantiate(cfg.data, _partial_=True)(**size)
    semi = build_semi(cfg) if preprocessing is None else None
    return ImageDataModule(
        settings, cfg.augment, spec.mean, spec.std, preprocessing, test_only, semi
    )


def build_semi(cfg: DictConfig) -> FixMatch | None:
    """The semi group's settings (semi=fixmatch), None for semi=none."""
    return instantiate(cfg.semi) if cfg.get("semi") else None


def model_spec(model_cfg: DictConfig) -> BackboneSpec:
    """The backbone spec of the model group: its family's, for its name and weights."""
    return backbone_spec(model_cfg.name, model_cfg.weights, model_cfg.get("family", "torchvision"))


def build_strategy(cfg: DictConfig) -> FinetuneStrategy:
    """The fine-tuning strategy, built once per run and shared by the model (learning rates) and
    the callbacks (freezing, feature cache)."""
    return instantiate(cfg.finetune)


def build_task(
    cfg: DictConfig, datamodule: ImageDataModule, strategy: FinetuneStrategy
) -> ClassificationTask:
    """The training task for `datamodule` (set up): the classifier for its classes and input
    size with `cfg.model.weights` loaded and a new head, the loss weighted for its training
    classes."""
    if datamodule.semi is not None:
        datamodule.semi.check_reachable(cfg.model.label_smoothing, len(datamodule.classes))
    run_config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    # The temperature, or a multi-label model's thresholds, are fitted after training
    # (thaw.fit_postprocessing); until then the thresholds are the sigmoid's midpoint.
    classes = datamodule.classes
    thresholds = (UNTUNED,) * len(classes) if datamodule.multilabel else None
    if thresholds is not None and cfg.get("distill", {}).get("teacher"):
        raise UserError("distill.teacher: distillation is for single-label data, not label sets")
    model = build_model(
        run_config,
        classes,
        datamodule.preprocessing,
        Postprocessing(thresholds=thresholds),
        channels_last=channels_last(cfg.trainer),
    )
    return ClassificationTask(
        model,
        optimizer=instantiate(cfg.optimizer),
        finetune=strategy,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        label_smoothing=cfg.model.label_smoothing,
        class_weights=resolve_class_weights(
            cfg.model.class_weights, datamodule.train_set.labels, datamodule.classes
        ),
        focal_gamma=cfg.model.focal_gamma,
        compile=cfg.model.compile,
        distillation=build_distillation(cfg, datamodule),
        semi=datamodule.semi,
        loss=cfg.model.get("loss", "auto"),
    )


def build_distillation(cfg: DictConfig, datamodule: ImageDataModule) -> Distillation | None:
    """The teacher of `distill.teacher` (None: no distillation), checked against the data."""
    settings = cfg.get("distill") or {}
    if not settings.get("teacher"):
        return None
    teacher = load_trained(settings.teacher)
    if teacher.classes != datamodule.classes:
        raise UserError(
            f"distill.teacher={settings.teacher} was trained on {teacher.classes}, but this run's "
            f"data has {datamodule.classes}: a teacher needs the same classes in the same order"
        )
    return Distillation.of(
        teacher,
        teacher.preprocessing,
        datamodule.preprocessing,
        settings.alpha,
        settings.temperature,
    )


def build_run_callbacks(
    strategy: FinetuneStrategy,
    datamodule: ImageDataModule,
    task: ClassificationTask,
    resume: ResumeState,
) -> list[pl.Callback]:
    """The callbacks every training run gets, whatever the callbacks group says: the phase of
    the strategy, the resume state, the feature cache where it applies, and a semi-supervised
    run's comparison with its warm-up."""
    callbacks: list[pl.Callback] = [FreezeUnfreeze(strategy), resume]
    blockers = ["distillation runs the teacher on the images"] if task.distillation else []
    if datamodule.semi is not None:
        blockers.append("semi=fixmatch runs the backbone on augmented unlabeled images")
    groups = list(task.model.backbone_groups)
    if wants_cache(strategy, datamodule.augment, groups, blockers):
        callbacks.append(FeatureCache(strategy))
    if datamodule.semi is not None and datamodule.semi.start_epoch > 0:
        callbacks.append(WarmupCheck(datamodule.semi.start_epoch))
    return callbacks


def build_trainer(cfg: DictConfig, extra_callbacks: list[pl.Callback]) -> pl.Trainer:
    """The Trainer with the callbacks and loggers groups, then `extra_callbacks`; checkpoints
    are written durably, and a failed save stops the run (thaw.checkpoint_io)."""
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    return instantiate_trainer(
        cfg.trainer,
        callbacks=with_progress(callbacks + extra_callbacks, cfg.trainer),
        logger=loggers or False,
        plugins=[DurableCheckpointIO()],
    )


def trainer_for_testing(cfg: DictConfig, trainer: pl.Trainer) -> pl.Trainer:
    """The fit trainer, except after spawned DDP workers: their test report would stay in the
    workers, so test on one device here. Either way each test process sees every test image
    once (the test loader is not sharded) and computes the metrics alone."""
    if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        return trainer
    return instantiate_trainer(
        cfg.trainer,
        devices=1,
        strategy="auto",
        callbacks=with_progress([], cfg.trainer),
        logger=trainer.loggers or False,
    )
