"""Knowledge distillation: a student follows a trained teacher's softened outputs."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from classifiers import task
from thaw.build import build_datamodule, build_strategy, build_task
from thaw.finetune import FreezeUnfreeze, TwoPhase
from thaw.finetune.distillation import Distillation
from thaw.models import load_trained


class RecordLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_a_student_equal_to_its_teacher_has_nothing_to_learn_and_the_teacher_never_changes(
    folder_run, quiet_trainer
):
    teacher = load_trained(folder_run / "checkpoints" / "best.ckpt")
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    network = copy.deepcopy(teacher)  # the student starts as the teacher, head dropout off
    network.head[0].p = 0.0
    student = task(
        network,
        optimizer=partial(torch.optim.SGD, lr=0.5),
        finetune=TwoPhase(freeze_epochs=1),  # the backbone frozen in eval mode, as a teacher
        label_smoothing=teacher.config["model"]["label_smoothing"],
        distillation=Distillation.of(
            teacher, teacher.preprocessing, teacher.preprocessing, alpha=1.0, temperature=4.0
        ),
    )
    recorder = RecordLoss()
    images = TensorDataset(torch.randn(12, 3, 28, 28), torch.arange(12) % 3)
    trainer = quiet_trainer(
        max_epochs=2, limit_val_batches=0, callbacks=[FreezeUnfreeze(student.finetune), recorder]
    )
    trainer.fit(student, DataLoader(images, batch_size=4))
    assert recorder.losses[0] == pytest.approx(0.0, abs=1e-6)  # KL(teacher || itself)
    assert max(recorder.losses[3:]) > 1e-4  # once the backbone trains, the student drifts
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key


def test_the_distillation_loss_is_hintons(folder_run):
    trained = load_trained(folder_run / "checkpoints" / "best.ckpt")
    distill = Distillation.of(trained, trained.preprocessing, trained.preprocessing, 0.3, 2.0)
    images = torch.randn(4, 3, 28, 28)
    student_logits = torch.randn(4, 3)
    with torch.no_grad():
        teacher_probs = (trained(images) / 2.0).softmax(-1)
    student_log_probs = (student_logits / 2.0).log_softmax(-1)
    kl = (teacher_probs * (teacher_probs.log() - student_log_probs)).sum(-1).mean()
    expected = 0.7 * 1.25 + 0.3 * 4.0 * kl
    got = distill.loss(torch.tensor(1.25), student_logits, images)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_teacher_of_other_classes_is_refused_with_both_lists(folder_run, train_config):
    teacher = Path(folder_run) / "checkpoints" / "best.ckpt"
    cfg = train_config(f"distill.teacher={teacher}")
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    both = r"trained on \['Bag', 'Sneaker', 'Trouser'\].*has \['T-shirt/top', 'Trouser'"
    with pytest.raises(ValueError, match=both):
        build_task(cfg, datamodule, build_strategy(cfg))
