"""`python eval.py ckpt_path=...`: recompute the test metrics from a checkpoint alone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
)

from thaw.analysis.evaluation_report import write_report
from thaw.analysis.multilabel_report import write_multilabel_report
from thaw.build import build_datamodule, trained_run_config
from thaw.checkpoint import CheckpointError, read_record, run_dir
from thaw.data.datamodule import ImageDataModule
from thaw.errors import UserError
from thaw.hardware import channels_last, instantiate_trainer, uses_cuda
from thaw.inference.inputs import resolve_inputs
from thaw.inference.predictor import TTA_MODES, Predictor, checkpoint_paths, predict_files
from thaw.models import ImageClassifier, load_trained
from thaw.models.task import TOP5_MIN_CLASSES, ClassificationTask
from thaw.openset.evaluation import open_set_metrics
from thaw.preprocess import Preprocessing
from thaw.progress.trainer import with_progress
from thaw.renderings import confusion_matrix_image, write_metrics

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Load the trained model, read only its test images (from `data_root` if they moved), test
    it, and write metrics.json. A list of checkpoints is tested as an ensemble; with `tta` the
    metrics with test-time augmentation are added under the same keys ending in `_tta`."""
    paths = checkpoint_paths(cfg.ckpt_path)
    models = [load_trained(p, channels_last=channels_last(cfg.trainer)) for p in paths]
    tta = cfg.get("tta", "none")
    if tta not in TTA_MODES:
        raise UserError(f"tta must be one of {list(TTA_MODES)}, got {tta!r}")
    # The first checkpoint's test data, preprocessed once for each member's preprocessing.
    data: dict[Preprocessing, ImageDataModule] = {}
    for model in models:
        if model.preprocessing not in data:
            data[model.preprocessing] = read_test_data(cfg, models[0].config, model, paths[0])
    output_dir = Path(cfg.paths.output_dir)
    with_tta = {"_tta": tta} if tta != "none" else {}
    if len(models) > 1:
        if cfg.get("ood"):
            raise UserError(
                f"ood= needs one checkpoint, not an ensemble of {len(models)}: an ensemble has "
                "no rejection rule (each member's score has its own scale)"
            )
        metrics = predictor_metrics(cfg, models, paths, data, {"": "none", **with_tta})
        metrics.update(checkpoint=paths, tta=tta)
        write_metrics(output_dir / "metrics.json", metrics)
    else:
        (trained,), (path,) = models, paths
        extra = (
            {"tta": tta, **predictor_metrics(cfg, models, paths, data, with_tta)}
            if with_tta
            else {}
        )
        open_set = None
        if cfg.get("ood"):
            open_set = ood_figures(cfg, trained, path, data[trained.preprocessing])
            extra.update({k: v for k, v in open_set.items() if k.startswith("test/")})
        shown = with_progress([], cfg.trainer)
        trainer = instantiate_trainer(cfg.trainer, logger=False, callbacks=shown)
        metrics = report_test_metrics(
            trainer,
            ClassificationTask.for_testing(trained),
            data[trained.preprocessing],
            output_dir,
            path,
            load_checkpoint=False,
            extra=extra,
            report=cfg.get("report", True),
            wall_time_s=training_wall_time(Path(path)),
            open_set=open_set,
        )
    log.info("Test metrics written to %s", output_dir / "metrics.json")
    return metrics


def ood_figures(
    cfg: DictConfig, trained: ImageClassifier, path: str, datamodule: ImageDataModule
) -> dict[str, Any]:
    """The rejection rule of `trained` on its known test images and on the images of no known
    class in `cfg.ood` (a folder, a glob, a file or a list, as predict's inputs), decoded as
    predict decodes them (thaw.openset.evaluation.open_set_metrics, with `ood` the folder)."""
    rule = trained.postprocessing.rejection
    if rule is None:
        raise UserError(
            f"ood= needs the model's rejection rule, and {path} has none (it was trained before "
            f"thaw fitted one): fit one without training, python fit_reject.py ckpt_path={path}"
        )
    device = "cuda" if uses_cuda(cfg.trainer.get("accelerator", "auto")) else "cpu"
    predictor = Predictor.from_trained([trained], device=device)
    known, correct = [], []
    for images, labels in datamodule.test_dataloader():
        probabilities, scores = predictor.batch_answers([images])
        known.append(scores)
        correct.append(probabilities.argmax(1) == labels.cpu())
    files = resolve_inputs(cfg.ood, key="ood")
    results = list(predict_files(predictor, files, datamodule.eval_batch_size))
    unreadable = [r.path for r in results if r.score is None]
    if unreadable:
        log.warning("ood: %d files could not be decoded and are left out", len(unreadable))
    unknown = torch.tensor([r.score for r in results if r.score is not None])
    figures = open_set_metrics(torch.cat(known), torch.cat(correct), unknown, rule)
    log.info(
        "Open set on %d known test images and %d from ood=%s: AUROC %.4f, FPR at 95%% TPR %.4f; "
        "the stored threshold keeps %.3f of the known and rejects %.3f of the others",
        len(figures["curves"]["known_scores"]),
        len(unknown),
        cfg.ood,
        figures["test/ood_auroc"],
        figures["test/ood_fpr95"],
        figures["test/known_kept"],
        figures["test/ood_rejected"],
    )
    return {**figures, "ood": str(cfg.ood)}


def training_wall_time(checkpoint: Path) -> float | None:
    """How long the run that wrote `checkpoint` took (its metrics.json), for the report."""
    return read_record(run_dir(checkpoint) / "metrics.json").get("train/wall_time_s")


def read_test_data(
    cfg: DictConfig, config: dict[str, Any], trained: ImageClassifier, path: str
) -> ImageDataModule:
    """The test images of the run `config` describes, preprocessed as `trained` (the model of
    checkpoint `path`) was trained."""
    train_cfg = trained_run_config(config, cfg.get("data_root"))
    datamodule = build_datamodule(train_cfg, trained.preprocessing, test_only=True)
    datamodule.setup("test")
    if datamodule.classes != trained.classes:
        raise CheckpointError(
            f"{path} was trained on classes {trained.classes}, but the data now gives "
            f"{datamodule.classes}; point data_root at the data it was trained on"
        )
    return datamodule


def predictor_metrics(
    cfg: DictConfig,
    models: list[ImageClassifier],
    paths: list[str],
    data: dict[Preprocessing, ImageDataModule],
    modes: dict[str, str],
) -> dict[str, float]:
    """Accuracy, top-5 accuracy and macro F1 of the models' averaged softmax on the test batches
    of `data` (one DataModule per preprocessing), for each {key suffix: tta mode} of `modes`;
    `paths` are the models' checkpoints."""
    device = "cuda" if uses_cuda(cfg.trainer.get("accelerator", "auto")) else "cpu"
    predictors = {s: Predictor.from_trained(models, tta, device, paths) for s, tta in modes.items()}
    loaders = [datamodule.test_dataloader() for datamodule in data.values()]
    outputs: dict[str, list[torch.Tensor]] = {suffix: [] for suffix in modes}
    labels = []
    for batches in zip(*loaders, strict=True):
        images = dict(zip(data, (images for images, _ in batches), strict=True))
        inputs = [images[model.preprocessing] for model in models]
        for suffix, predictor in predictors.items():
            outputs[suffix].append(predictor.batch_probabilities(inputs))
        labels.append(batches[0][1].cpu())
    target = torch.cat(labels)
    metrics: dict[str, float] = {}
    for suffix, probabilities in outputs.items():
        thresholds = predictors[suffix].thresholds
        metrics.update(scores(torch.cat(probabilities), target, suffix, thresholds))
    return metrics


def scores(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    suffix: str = "",
    thresholds: torch.Tensor | None = None,
) -> dict[str, float]:
    """test/acc, test/acc_top5 (with more than 5 classes) and test/f1_macro (+ `suffix`),
    computed as the training task logs them; for a multi-label model's `thresholds`, test/map,
    and test/f1_micro, test/f1_macro and test/exact_match (= test/acc) of the sets they give."""
    n = probabilities.shape[1]
    if thresholds is not None:
        sets, target = (probabilities >= thresholds).long(), target.long()
        exact = multilabel_exact_match(sets, target, n)
        values = {
            "map": multilabel_average_precision(probabilities, target, n),
            "f1_micro": multilabel_f1_score(sets, target, n, average="micro"),
            "f1_macro": multilabel_f1_score(sets, target, n, average="macro"),
            "exact_match": exact,
            "acc": exact,
        }
        return {f"test/{name}{suffix}": float(value) for name, value in values.items()}
    values = {
        "acc": multiclass_accuracy(probabilities, target, n, average="micro"),
        "f1_macro": multiclass_f1_score(probabilities, target, n, average="macro"),
    }
    if n > TOP5_MIN_CLASSES:
        values["acc_top5"] = multiclass_accuracy(probabilities, target, n, top_k=5, average="micro")
    return {f"test/{name}{suffix}": float(value) for name, value in values.items()}


def report_test_metrics(
    trainer: pl.Trainer,
    task: ClassificationTask,
    datamodule: ImageDataModule,
    output_dir: Path,
    checkpoint: str | None,
    load_checkpoint: bool = True,
    extra: dict[str, Any] | None = None,
    report: bool = True,
    wall_time_s: float | None = None,
    open_set: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test the task's model (with the weights of `checkpoint` unless they are loaded already),
    then write metrics.json (with the `extra` values and `train/wall_time_s`, the time from the
    run's start to its test), log the confusion matrix as an image, and with `report` write
    report.json and report.html beside it (with the `open_set` section, see ood_figures)."""
    ckpt_path = checkpoint if load_checkpoint else None
    (results,) = trainer.test(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    # Per-class figures go into metrics.json once, under test/per_class_acc or test/per_label.
    metrics: dict[str, Any] = {k: v for k, v in results.items() if "_class/" not in k}
    metrics.update({"test/" + k: v for k, v in task.test_report.items()})
    metrics["checkpoint"] = checkpoint
    metrics.update(extra or {})
    if wall_time_s is not None:
        metrics["train/wall_time_s"] = wall_time_s
    if not trainer.is_global_zero:
        return metrics
    write_metrics(output_dir / "metrics.json", metrics)
    writers = [
        logger.experiment
        for logger in trainer.loggers
        if isinstance(logger, pl.loggers.TensorBoardLogger)
    ]
    for writer in writers:
        if not task.multilabel:  # label sets have no confusion matrix
            matrix = task.test_report["confusion_matrix"]
            image = confusion_matrix_image(matrix, task.model.classes)
            writer.add_image("test/confusion_matrix", image, dataformats="HWC")
        writer.flush()
    if report:
        # Label sets have their own report, which has no open-set section.
        write, sections = (
            (write_multilabel_report, {})
            if task.multilabel
            else (write_report, {"open_set": open_set})
        )
        write(
            task.model,
            datamodule.test_dataloader(),
            output_dir,
            task.model.config,
            checkpoint,
            wall_time_s,
            writers,
            **sections,
        )
    return metrics


def task(cfg: DictConfig) -> None:
    """The command line's job (thaw.cli.evaluate)."""
    metrics = evaluate(cfg)
    summary = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print(OmegaConf.to_yaml({"metrics": summary, "run_dir": str(cfg.paths.output_dir)}))
