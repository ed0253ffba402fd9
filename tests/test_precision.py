"""Mixed precision through the unfreeze: losses stay finite and the thawed backbone trains."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from test_finetune import GROUPS, changed, group_snapshots, loader, make_model
from thaw.finetune import FreezeUnfreeze, TwoPhase

NO_GPU = not torch.cuda.is_available()


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize(
    ("accelerator", "precision"),
    [
        ("cpu", "bf16-mixed"),
        pytest.param("gpu", "bf16-mixed", marks=pytest.mark.skipif(NO_GPU, reason="needs a GPU")),
        pytest.param("gpu", "16-mixed", marks=pytest.mark.skipif(NO_GPU, reason="needs a GPU")),
    ],
)
def test_mixed_precision_trains_through_the_unfreeze(quiet_trainer, accelerator, precision):
    model = make_model(TwoPhase(freeze_epochs=1), lr=1e-3)
    before = group_snapshots(model)
    losses = RecordLosses()
    trainer = quiet_trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=2,
        callbacks=[FreezeUnfreeze(model.finetune), losses],
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=loader())
    assert len(losses.losses) == 6 and all(math.isfinite(x) for x in losses.losses)
    model.cpu()
    after = model.model.layer_groups()
    for name in GROUPS:
        assert any(changed(before[name], after[name]).values()), f"{name} did not train"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
