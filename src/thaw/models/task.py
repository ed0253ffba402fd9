"""The training task: an ImageClassifier with its loss, metrics and an optimizer over its layer
groups."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torchmetrics import ConfusionMatrix, MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)

from thaw.checkpoint import FORMAT, REJECTION_PREFIX, RUN_KEY, upgrade
from thaw.errors import UserError
from thaw.models.loss import training_loss
from thaw.models.network import ImageClassifier
from thaw.renderings import metric_tag
from thaw.semi.stream import SemiBatch

if TYPE_CHECKING:
    from thaw.finetune import FinetuneStrategy
    from thaw.finetune.distillation import Distillation
    from thaw.semi.fixmatch import FixMatch

# Top-5 accuracy is reported only with more classes than this.
TOP5_MIN_CLASSES = 5

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., dict[str, Any]]


class ClassificationTask(pl.LightningModule):
    """Training around an ImageClassifier: its loss, metrics and an optimizer over its layer
    groups. The classifier (`model`) is what a checkpoint's weights, record and every consumer
    are about; the task is never loaded for inference.

    The `finetune` strategy gives the layer groups their learning rates; with `distillation`,
    the training loss also follows a teacher's softened outputs; with `semi` (FixMatch), a
    batch that brings unlabeled images (a SemiBatch) adds their loss.

    A multi-label model (its Postprocessing has thresholds) trains on label sets: `acc` is the
    exact-match ratio (scikit-learn's accuracy for label sets) at the model's thresholds, and
    `map` the mean average precision over labels."""

    def __init__(
        self,
        model: ImageClassifier,
        optimizer: OptimizerFactory | None,
        finetune: FinetuneStrategy | None,
        scheduler: SchedulerFactory | None,
        label_smoothing: float,
        class_weights: Sequence[float] | None,
        focal_gamma: float,
        compile: bool = False,
        distillation: Distillation | None = None,
        semi: FixMatch | None = None,
        loss: str = "auto",
    ) -> None:
        super().__init__()
        self.model = model
        if compile:
            model.backbone.compile()  # in place: state_dict keys stay those of the eager model
        num_classes = len(model.classes)
        # One input of the trained size: the model summary counts its FLOPs per image with it.
        side = model.preprocessing.input_size
        self.example_input_array = torch.zeros(1, 3, side, side)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.finetune = finetune
        self.distillation = distillation
        self.semi = semi
        self.multilabel = model.postprocessing.multilabel
        self.criterion = training_loss(
            loss, self.multilabel, label_smoothing, class_weights, focal_gamma
        )
        self.test_report: dict[str, Any] = {}
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints, so a resumed run keeps it
        if self.multilabel:
            self._multilabel_metrics(num_classes)
            return
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        # Every test process sees the whole test set (it is not sharded): no summing over ranks.
        alone = {"sync_on_compute": False}
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", **alone)
        # Top-5 only where it means something: with 5 classes or fewer it is always 1.
        self.test_acc_top5 = (
            MulticlassAccuracy(num_classes, top_k=5, average="micro", **alone)
            if num_classes > TOP5_MIN_CLASSES
            else None
        )
        self.test_f1_macro = MulticlassF1Score(num_classes, average="macro", **alone)
        self.test_acc_per_class = MulticlassAccuracy(num_classes, average=None, **alone)
        self.test_confusion = ConfusionMatrix(task="multiclass", num_classes=num_classes, **alone)

    def _multilabel_metrics(self, labels: int) -> None:
        """The metrics of label sets. The set-based ones are fed the sets the thresholds give
        (0/1 predictions: torchmetrics takes one threshold for all labels), AP the
        probabilities."""
        self.train_acc = MultilabelExactMatch(labels)
        self.val_acc = MultilabelExactMatch(labels)
        self.val_map = MultilabelAveragePrecision(labels, average="macro")
        alone = {"sync_on_compute": False}
        self.test_sets = MetricCollection(
            {
                "acc": MultilabelExactMatch(labels, **alone),
                "exact_match": MultilabelExactMatch(labels, **alone),
                "f1_micro": MultilabelF1Score(labels, average="micro", **alone),
                "f1_macro": MultilabelF1Score(labels, average="macro", **alone),
            },
            compute_groups=False,
        )
        self.test_map = MultilabelAveragePrecision(labels, average="macro", **alone)
        self.test_per_label = MetricCollection(
            {
                "ap": MultilabelAveragePrecision(labels, average=None, **alone),
                "precision": MultilabelPrecision(labels, average=None, **alone),
                "recall": MultilabelRecall(labels, average=None, **alone),
            },
            compute_groups=False,
        )

    def predicted_sets(self, logits: torch.Tensor) -> torch.Tensor:
        """A multi-label model's label sets (0/1, float) of logits, at its thresholds."""
        postprocessing = self.model.postprocessing
        return postprocessing.label_sets(postprocessing.probabilities(logits.float())).float()

    @classmethod
    def for_testing(cls, model: ImageClassifier) -> ClassificationTask:
        """The task that tests a trained classifier (eval.py): no optimizer, and the test loss
        as its training computed it, with its config's label smoothing."""
        settings = model.config["model"]
        smoothing, loss = settings["label_smoothing"], settings.get("loss", "auto")
        return cls(model, None, None, None, smoothing, None, focal_gamma=0.0, loss=loss)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (of images, or of cached backbone features)."""
        return self.model(inputs)

    def on_fit_start(self) -> None:
        if self.distillation is not None:  # not a submodule: Lightning does not move it
            self.distillation.to(self.device)

    # -- steps --------------------------------------------------------------------------------
    def _shared_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A batch is (images, labels), or (images, labels, soft targets) when a batch-level
        augmentation such as mixup mixed them: the loss uses soft targets, metrics the labels."""
        images, labels, *soft_targets = batch
        logits = self(images)
        loss = self.criterion(logits, soft_targets[0] if soft_targets else labels)
        return loss, logits, labels

    def training_step(
        self, batch: tuple[torch.Tensor, ...] | SemiBatch, batch_idx: int
    ) -> torch.Tensor | None:
        labelled = batch.labelled if isinstance(batch, SemiBatch) else batch
        if len(labelled[1]) == 1:
            # An epoch of N % batch_size == 1 images ends on a batch of one, on which BatchNorm
            # cannot train (small images pool to 1x1): skipped, so no optimizer step is taken.
            return None
        if isinstance(batch, SemiBatch):
            loss, logits, labels = self._semi_step(batch)
        else:
            loss, logits, labels = self._shared_step(labelled)
        if self.distillation is not None:
            loss = self.distillation.loss(loss, logits, labelled[0])
        self.train_acc(*self._scored(logits, labels))
        size = {"batch_size": len(labels)}  # of a SemiBatch too: its labelled images
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, **size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, **size)
        return loss

    def _semi_step(self, batch: SemiBatch) -> tuple[torch.Tensor, ...]:
        """FixMatch's step: the weak views' predictions (no gradient) are the pseudo-labels; the
        labelled and strong images go through the model in one batch, so BatchNorm normalises
        them together. Returns the total loss and the labelled logits and labels."""
        semi = self.semi
        if semi is None:
            raise RuntimeError("a batch with unlabeled images, but this task has no semi setting")
        images, labels, *soft_targets = batch.labelled
        with torch.no_grad():
            weak_logits = self(batch.weak)
        logits, strong_logits = self(torch.cat([images, batch.strong])).split(
            [len(images), len(batch.strong)]
        )
        supervised = self.criterion(logits, soft_targets[0] if soft_targets else labels)
        unlabeled = semi.loss(weak_logits, strong_logits)
        loss = supervised + semi.weight * unlabeled.loss
        mask_rate = unlabeled.mask.float().mean()
        size = {"batch_size": len(labels)}
        self.log("train/loss_u", unlabeled.loss, on_step=True, on_epoch=True, **size)
        self.log("train/mask_rate", mask_rate, on_step=True, on_epoch=True, prog_bar=True, **size)
        known = unlabeled.mask & (batch.hidden >= 0)
        kept = int(known.sum())
        if kept:
            right = (unlabeled.targets[known] == batch.hidden[known]).float().mean()
            self.log("train/pseudo_acc", right, on_step=False, on_epoch=True, batch_size=kept)
        return loss, logits, labels

    def _scored(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the accuracy metrics take: logits and labels, or of label sets the predicted
        sets and the true ones."""
        if self.multilabel:
            return self.predicted_sets(logits), labels.long()
        return logits, labels

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        lrs = {f"lr/{group['name']}": group["lr"] for group in optimizer.param_groups}
        self.log_dict(lrs, on_step=True, on_epoch=False)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, labels = self._shared_step(batch)
        self.val_acc(*self._scored(logits, labels))
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)
        if self.multilabel:
            self.val_map(logits.float().sigmoid(), labels.long())
            self.log("val/map", self.val_map, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # an untrained model's accuracy is no "best"
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, labels = self._shared_step(batch)
        if self.multilabel:
            self._multilabel_test_step(loss, logits, labels.long())
            return
        for metric in (self.test_acc, self.test_acc_top5, self.test_f1_macro):
            if metric is not None:
                metric(logits, labels)
        self.test_acc_per_class.update(logits, labels)
        self.test_confusion.update(logits, labels)
        self.log("test/loss", loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
        if self.test_acc_top5 is not None:
            self.log("test/acc_top5", self.test_acc_top5, on_step=False, on_epoch=True)
        self.log("test/f1_macro", self.test_f1_macro, on_step=False, on_epoch=True)

    def _multilabel_test_step(
        self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> None:
        probabilities = self.model.postprocessing.probabilities(logits.float())
        sets = self.model.postprocessing.label_sets(probabilities).float()
        self.test_sets.update(sets, labels)
        self.test_map.update(probabilities, labels)
        self.test_per_label["ap"].update(probabilities, labels)
        for name in ("precision", "recall"):
            self.test_per_label[name].update(sets, labels)
        self.log("test/loss", loss, on_step=False, on_epoch=True)
        self.log("test/map", self.test_map, on_step=False, on_epoch=True)
        for name, metric in self.test_sets.items():
            self.log(f"test/{name}", metric, on_step=False, on_epoch=True)

    def _multilabel_test_report(self) -> None:
        """Per label: its AP, and its precision and recall at its threshold."""
        figures = {name: m.compute().tolist() for name, m in self.test_per_label.items()}
        classes = self.model.classes
        per_label = {
            label: {name: values[i] for name, values in figures.items()}
            for i, label in enumerate(classes)
        }
        for label, values in per_label.items():
            for name, value in values.items():
                self.log(f"test/{name}_class/{metric_tag(label)}", value)
        self.test_report = {"per_label": per_label}
        self.test_per_label.reset()

    def on_test_epoch_end(self) -> None:
        if self.multilabel:
            self._multilabel_test_report()
            return
        per_class = self.test_acc_per_class.compute().tolist()
        classes = self.model.classes
        for name, acc in zip(classes, per_class, strict=True):
            self.log(f"test/acc_class/{metric_tag(name)}", acc)
        self.test_report = {
            "per_class_acc": dict(zip(classes, per_class, strict=True)),
            "confusion_matrix": self.test_confusion.compute().tolist(),
        }
        self.test_acc_per_class.reset()
        self.test_confusion.reset()

    # -- optimization -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None or self.finetune is None:
            raise RuntimeError("this task was built for testing: it has no optimizer")
        groups = self.model.layer_groups()
        base = getattr(self.optimizer_factory, "keywords", {})
        if "lr" not in base:
            raise UserError("the optimizer config needs an `lr` (optimizer.lr=...)")
        param_groups = self.finetune.param_groups(groups, base["lr"], base.get("weight_decay", 0.0))
        optimizer = self.optimizer_factory(param_groups)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)  # also sets num_training_batches
        batches, accumulate = (
            self.trainer.num_training_batches,
            self.trainer.accumulate_grad_batches,
        )
        steps_per_epoch = max(1, math.ceil(batches / accumulate))
        names = [group["group"] for group in optimizer.param_groups]
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs > 0 else total_steps
        thaw = self.finetune.thaw_warmup(
            names, list(self.model.backbone_groups), steps_per_epoch, max_epochs
        )
        extra = {} if thaw is None else {"group_factors": thaw}
        scheduler = self.scheduler_factory(
            optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, **extra
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # -- checkpoint contents ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_KEY] = {**self.model.record(), "format": FORMAT}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming from a checkpoint of an older thaw: its weights in today's layout first.
        A rejection rule's buffers (in a best.ckpt) are left out where the model has no rule,
        as one being trained has not: it is fitted again after fitting."""
        upgrade(checkpoint)
        state = checkpoint.get("state_dict", {})
        if self.model.rejection is None:
            for name in [k for k in state if k.startswith(REJECTION_PREFIX)]:
                del state[name]
