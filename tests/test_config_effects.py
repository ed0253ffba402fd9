"""Config values reach their effect: each test composes the real config, fits with the real
`thaw.train.run` and watches, from a probe callback, what the value is meant to change (when the
backbone thaws, the optimizer's learning rates, the LR schedule, when fitting stops).

test_finetune.py checks the strategies and schedules called directly; these check that the
composed config builds and wires them so that a run behaves as the value says.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EarlyStopping
from torch.optim.lr_scheduler import ReduceLROnPlateau

from thaw.models.backbones import HEAD, STAGES
from thaw.train import run

TrainConfig = Callable[..., DictConfig]

# Only the fit matters here: no test, calibration, checkpoints, logger or sanity validation.
FIT_ONLY = [
    "test=false",
    "calibrate=false",
    "logger=none",
    "++callbacks.model_checkpoint=null",
    "++callbacks.last_checkpoint=null",
    "++callbacks.batch_preview=null",
    "+trainer.enable_checkpointing=false",
    "+trainer.num_sanity_val_steps=0",
]
# Nothing can learn: the backbone is frozen in eval mode (linear_probe) and the head's LR is 0,
# so every epoch's validation metrics are bitwise those of the first; the backbone groups keep a
# nonzero LR that a scheduler can visibly reduce.
NOTHING_LEARNS = [
    "finetune=linear_probe",
    "finetune.cache_features=false",
    "finetune.group_lrs={head:0.0}",
]


class Probe(pl.Callback):
    """Records per epoch what a config value is meant to change: each optimizer group's LR at
    every step, which layer groups' tensors moved and whether the backbone had requires_grad,
    and the validation metrics. Runs before thaw's own callbacks (see `run`), so requires_grad is
    read at epoch end, after FreezeUnfreeze applied the epoch's phase."""

    def __init__(self) -> None:
        self.trainer: pl.Trainer | None = None
        self.base_lrs: list[tuple[str, float]] = []
        self.lrs: dict[int, list[dict[str, float]]] = defaultdict(list)
        self.moved: list[set[str]] = []
        self.backbone_requires_grad: list[set[bool]] = []
        self.val: list[dict[str, float]] = []
        self._before: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = trainer
        groups = trainer.optimizers[0].param_groups
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        base = getattr(scheduler, "base_lrs", [g["lr"] for g in groups])
        self.base_lrs = [(g["name"], lr) for g, lr in zip(groups, base, strict=True)]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before = {
            name: {k: v.detach().clone() for k, v in group.tensors().items()}
            for name, group in pl_module.model.layer_groups().items()
        }

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        groups = trainer.optimizers[0].param_groups
        self.lrs[trainer.current_epoch].append({g["name"]: g["lr"] for g in groups})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        moved = set()
        for name, group in pl_module.model.layer_groups().items():
            now = group.tensors()
            if any(not torch.equal(self._before[name][k], now[k]) for k in now):
                moved.add(name)
        self.moved.append(moved)
        self.backbone_requires_grad.append(
            {p.requires_grad for p in pl_module.model.backbone.parameters()}
        )
        metrics = trainer.callback_metrics
        self.val.append({k: float(metrics[k]) for k in ("val/loss", "val/acc") if k in metrics})


def fit(train_config: TrainConfig, *overrides: str) -> Probe:
    """Fit the composed tiny config with `overrides` (after FIT_ONLY), watched by a Probe."""
    probe = Probe()
    run(train_config(*FIT_ONLY, *overrides), callbacks=[probe])
    return probe


def test_freeze_epochs_thaws_the_backbone_at_that_epoch(train_config: TrainConfig) -> None:
    """finetune.freeze_epochs=2: the backbone is bitwise fixed (weights and BatchNorm statistics)
    in epochs 0 and 1 while the head learns, and every stage trains from epoch 2, not 1 or 3."""
    probe = fit(
        train_config,
        "finetune=two_phase",
        "finetune.freeze_epochs=2",
        "trainer.max_epochs=3",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=0",
    )
    assert probe.backbone_requires_grad == [{False}, {False}, {True}]
    assert probe.moved == [{HEAD}, {HEAD}, {*STAGES, HEAD}]


def test_backbone_lr_ratio_and_group_lrs_reach_the_optimizer(train_config: TrainConfig) -> None:
    """The groups' base LRs (the scheduler's, before it scales them) are geometric from
    optimizer.lr * finetune.backbone_lr_ratio up to optimizer.lr, except stage2, which
    finetune.group_lrs sets; both values differ from the defaults, so a lost override fails."""
    probe = fit(
        train_config,
        "finetune=full",  # one epoch; the LRs are the same for every strategy
        "optimizer.lr=2e-3",
        "finetune.backbone_lr_ratio=0.01",
        "finetune.group_lrs={stage2:7e-4}",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=0",
    )
    expected = {
        "stage1": 2e-5,
        "stage2": 7e-4,
        "stage3": 2e-4,
        "stage4": 2e-3 * 0.01**0.25,
        "head": 2e-3,
    }
    assert {name for name, _ in probe.base_lrs} == set(expected)
    for name, lr in probe.base_lrs:
        assert lr == pytest.approx(expected[name], rel=1e-12), name


def test_step_scheduler_multiplies_every_lr_by_gamma_at_the_epoch_boundary(
    train_config: TrainConfig,
) -> None:
    """scheduler=step with step_epochs=1 (default 10) and gamma=0.3 (default 0.1): every group's
    LR is its base LR for both steps of epoch 0 and exactly gamma times it in epoch 1."""
    probe = fit(
        train_config,
        "scheduler=step",
        "scheduler.step_epochs=1",
        "scheduler.gamma=0.3",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=0",
    )
    base = dict(probe.base_lrs)
    assert len(probe.lrs[0]) == len(probe.lrs[1]) == 2
    for epoch, factor in ((0, 1.0), (1, 0.3)):
        for step in probe.lrs[epoch]:
            assert step == pytest.approx({n: lr * factor for n, lr in base.items()}, rel=1e-12)


def test_plateau_scheduler_cuts_the_lr_by_factor_after_patience_flat_epochs(
    train_config: TrainConfig,
) -> None:
    """scheduler=plateau with patience=1 and factor=0.5 on a run whose val/loss cannot improve:
    epoch 0 sets the best, epochs 1 and 2 are flat, so the scheduler halves every nonzero LR
    after epoch 2: epoch 3 trains at half, and not earlier (patience 0 would cut after epoch 1)."""
    probe = fit(
        train_config,
        *NOTHING_LEARNS,
        "scheduler=plateau",
        "scheduler.patience=1",
        "scheduler.factor=0.5",
        "trainer.max_epochs=4",
        "+trainer.limit_train_batches=1",
    )
    losses = [v["val/loss"] for v in probe.val]
    assert len(losses) == 4 and len(set(losses)) == 1  # the premise: nothing improved
    scheduler_config = probe.trainer.lr_scheduler_configs[0]
    assert isinstance(scheduler_config.scheduler, ReduceLROnPlateau)
    assert scheduler_config.monitor == "val/loss"
    base = dict(probe.base_lrs)
    assert base[HEAD] == 0.0 and all(base[s] > 0 for s in STAGES)
    first_step = [probe.lrs[epoch][0] for epoch in range(4)]
    for epoch, factor in enumerate((1.0, 1.0, 1.0, 0.5)):
        expected = {n: lr * factor for n, lr in base.items()}
        assert first_step[epoch] == pytest.approx(expected, rel=1e-12), f"epoch {epoch}"


def test_early_stopping_stops_the_fit_after_patience_epochs_without_improvement(
    train_config: TrainConfig,
) -> None:
    """callbacks=early_stopping with patience=2 (default 3) and max_epochs=6 on a run whose
    val/acc cannot improve: epoch 0 sets the best, epochs 1 and 2 do not beat it, so the fit
    ends after 3 epochs, not at max_epochs (nor after 4, as the default patience would)."""
    probe = fit(
        train_config,
        *NOTHING_LEARNS,
        "callbacks=early_stopping",
        "callbacks.early_stopping.patience=2",
        "trainer.max_epochs=6",
        "+trainer.limit_train_batches=1",
    )
    accuracies = [v["val/acc"] for v in probe.val]
    assert len(set(accuracies)) == 1  # the premise: nothing improved
    assert sorted(probe.lrs) == [0, 1, 2] and len(probe.val) == 3
    (stopper,) = [c for c in probe.trainer.callbacks if isinstance(c, EarlyStopping)]
    assert stopper.stopped_epoch == 2 and probe.trainer.should_stop
