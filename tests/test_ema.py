"""callbacks=ema: Lightning's EMAWeightAveraging (thaw's EMA), so validation, test, best.ckpt and
export see the average of the weights."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from classifiers import classifier, task
from conftest import PREPROCESSING
from thaw.finetune import FreezeUnfreeze, Full
from thaw.finetune.ema import EMA
from thaw.models import create_backbone


class RecordWeights(pl.Callback):
    """The model's own (not averaged) parameters after every optimizer step, and those the test
    ran with."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.tested: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(snapshot(pl_module))

    def on_test_start(self, trainer, pl_module) -> None:
        self.tested = snapshot(pl_module)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.fixture(scope="module")
def fitted(quiet_trainer, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Three SGD steps of resnet18 with EMA(decay=0.6), a checkpoint saved at the epoch's end
    (the average and the raw weights), then `trainer.test` of that checkpoint."""
    torch.manual_seed(0)
    model = task(
        classifier(create_backbone("resnet18", weights=None), ["a", "b", "c"], PREPROCESSING),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        finetune=Full(),
    )
    recorder = RecordWeights()
    directory = tmp_path_factory.mktemp("ema")
    trainer = quiet_trainer(
        enable_checkpointing=True,
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[
            FreezeUnfreeze(model.finetune),
            recorder,
            EMA(decay=0.6),
            ModelCheckpoint(dirpath=directory, filename="epoch"),
        ],
    )
    images = DataLoader(
        TensorDataset(torch.randn(24, 3, 28, 28), torch.arange(24) % 3), batch_size=8
    )
    trainer.fit(model, images)
    checkpoint = directory / "epoch.ckpt"
    trainer.test(model, images, ckpt_path=checkpoint, weights_only=True)
    return model, recorder, checkpoint


def test_the_checkpoint_holds_the_hand_computed_average_and_the_raw_weights(fitted: tuple) -> None:
    _, recorder, path = fitted
    first, second, third = recorder.steps
    expected = {}
    for name, weight in first.items():  # the average starts at the weights after step 1
        average = 0.6 * weight + 0.4 * second[name]
        expected[name] = 0.6 * average + 0.4 * third[name]
    checkpoint = torch.load(path, weights_only=True)
    for name, value in expected.items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(checkpoint["current_model_state"][name], third[name])
    assert not torch.equal(expected["model.head.1.weight"], third["model.head.1.weight"])


def test_testing_the_checkpoint_after_fit_tests_the_average(fitted: tuple) -> None:
    """Lightning's own callback loads `current_model_state` here, so the test would score the
    raw weights that no exported or served model has."""
    model, recorder, path = fitted
    average = torch.load(path, weights_only=True)["state_dict"]
    for name, value in recorder.tested.items():
        assert torch.equal(value, average[name]), name
    for name, value in model.named_parameters():  # what export sees after the run
        assert torch.equal(value, average[name]), name


class StopAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        trainer.should_stop = True


@pytest.mark.parametrize(("decay", "warned"), [(0.999, True), (0.9, False)])
def test_a_decay_that_spans_too_much_of_the_run_is_named_with_one_that_fits(
    quiet_trainer, caplog, decay, warned
):
    """40 steps: 0.9 spans about 10, a quarter of the run; 0.999 would keep the early weights."""
    model = task(
        classifier(create_backbone("resnet18", weights=None), ["a", "b"], PREPROCESSING),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        finetune=Full(),
    )
    trainer = quiet_trainer(
        max_epochs=10, limit_val_batches=0, callbacks=[StopAtStart(), EMA(decay=decay)]
    )
    images = TensorDataset(torch.randn(16, 3, 28, 28), torch.arange(16) % 2)
    with caplog.at_level("WARNING", logger="thaw.finetune.ema"):
        trainer.fit(model, DataLoader(images, batch_size=4))
    assert ("Set callbacks.ema.decay=0.900 or less" in caplog.text) == warned, caplog.text


def test_a_decay_outside_0_and_1_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="decay must be between 0 and 1, got 1.5"):
        EMA(decay=1.5)
