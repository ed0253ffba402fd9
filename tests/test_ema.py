"""callbacks=ema: Lightning's EMAWeightAveraging, so validation, best.ckpt and export see the
average of the weights."""

from __future__ import annotations

from functools import partial

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch.utils.data import DataLoader, TensorDataset

from conftest import PREPROCESSING
from thaw.finetune import FreezeUnfreeze, Full
from thaw.models import Classifier, create_backbone


class RecordWeights(pl.Callback):
    """The model's own (not averaged) parameters after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def test_the_checkpoint_holds_the_hand_computed_average(quiet_trainer, tmp_path):
    torch.manual_seed(0)
    model = Classifier(
        create_backbone("resnet18", weights=None),
        ["a", "b", "c"],
        PREPROCESSING,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        finetune=Full(),
    )
    recorder = RecordWeights()
    trainer = quiet_trainer(
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[FreezeUnfreeze(model.finetune), recorder, EMAWeightAveraging(decay=0.6)],
    )
    images = TensorDataset(torch.randn(24, 3, 28, 28), torch.arange(24) % 3)
    trainer.fit(model, DataLoader(images, batch_size=8))
    trainer.save_checkpoint(tmp_path / "last.ckpt", weights_only=True)

    first, second, third = recorder.steps
    expected = {}
    for name, weight in first.items():  # the average starts at the weights after step 1
        average = 0.6 * weight + 0.4 * second[name]
        expected[name] = 0.6 * average + 0.4 * third[name]
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    trained = dict(model.named_parameters())  # what test and export see after the fit
    for name, value in expected.items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(trained[name], checkpoint["state_dict"][name])
    assert not torch.equal(expected["head.1.weight"], third["head.1.weight"])
