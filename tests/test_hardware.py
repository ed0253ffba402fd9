"""Speed options: precision and memory format resolved per accelerator, channels_last and
torch.compile giving the model they were asked for, with the same outputs and checkpoints."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from classifiers import classifier, task
from conftest import PREPROCESSING
from thaw.finetune import Full
from thaw.hardware import channels_last, instantiate_trainer, resolve_precision
from thaw.models import Backbone, create_backbone, load_trained
from thaw.models.layer_groups import blocks_from_paths
from thaw.models.task import ClassificationTask
from thaw.train import run


def sgd_task(
    backbone: Backbone, channels_last: bool = False, compile: bool = False
) -> ClassificationTask:
    torch.manual_seed(1)  # the head
    optimizer = partial(torch.optim.SGD, lr=0.1)
    model = classifier(backbone, ["a", "b", "c"], PREPROCESSING, channels_last=channels_last)
    return task(model, optimizer=optimizer, finetune=Full(), compile=compile).eval()


def test_auto_settings_follow_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_precision("auto", "cpu") == "32-true"
    with pytest.raises(ValueError, match=r"precision=16-mixed needs a CUDA GPU.*bf16-mixed, 32"):
        resolve_precision("16-mixed", "cpu")
    assert channels_last(OmegaConf.create({"channels_last": "auto", "accelerator": "cpu"})) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("16-mixed", "auto") == "16-mixed"
    assert channels_last(OmegaConf.create({"channels_last": "auto"})) is True
    assert channels_last(OmegaConf.create({"channels_last": "auto", "accelerator": "cpu"})) is False
    # A GPU with native bf16 (Ampere on), and one that only emulates it (V100, T4).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", "auto") == resolve_precision("auto", "gpu") == "bf16-mixed"
    emulated = lambda including_emulation=True: including_emulation  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated)
    assert resolve_precision("auto", "gpu") == "32-true"
    with pytest.raises(ValueError, match="trainer.channels_last must be true, false or auto"):
        channels_last(OmegaConf.create({"channels_last": "yes"}))


def test_the_trainer_never_sees_thaw_keys(train_config) -> None:
    cfg = train_config("trainer.channels_last=true", "trainer.precision=auto")
    trainer = instantiate_trainer(cfg.trainer, logger=False)
    assert trainer.precision == "32-true"


def test_channels_last_model_computes_the_same_logits(train_config) -> None:
    torch.manual_seed(0)
    plain = sgd_task(create_backbone("resnet18", weights=None))
    torch.manual_seed(0)
    nhwc = sgd_task(create_backbone("resnet18", weights=None), channels_last=True)
    conv = nhwc.model.backbone.get_submodule("conv1").weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.randn(4, 3, 28, 28)
    torch.testing.assert_close(nhwc(images), plain(images), atol=1e-5, rtol=1e-4)
    # A run trains and tests in that layout, and its checkpoint does not depend on it.
    cfg = train_config("trainer.channels_last=true", "finetune=full", "trainer.max_epochs=1")
    assert "test/acc" in run(cfg)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    with torch.inference_mode():
        nchw = load_trained(best)(images)
        torch.testing.assert_close(load_trained(best, channels_last=True)(images), nchw)


def test_compiled_backbone_keeps_outputs_and_checkpoint_keys() -> None:
    def tiny() -> Backbone:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        blocks = blocks_from_paths(net, {"stage1": ["0", "1"]})
        return Backbone("tiny", net, 8, blocks, (0.5,) * 3, (0.5,) * 3)

    eager, compiled = sgd_task(tiny()), sgd_task(tiny(), compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(compiled(images), eager(images), atol=1e-5, rtol=1e-4)
