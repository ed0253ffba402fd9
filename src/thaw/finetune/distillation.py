"""Knowledge distillation (Hinton et al., 2015): a student learns from a trained teacher's
softened outputs as well as from the labels, e.g. a mobilenet_v3 from a resnet50.

The teacher is a thaw checkpoint with the same classes. It runs in eval mode without gradients on
the student's own augmented batch, its input renormalised if its mean/std differ. It is held
outside the student's modules, so it is in neither the optimizer nor the student's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from thaw.errors import UserError
from thaw.preprocess import Preprocessing


@dataclass
class Distillation:
    """loss = (1 - alpha) x the task loss + alpha x T^2 x KL(teacher || student) at temperature T
    (the T^2 keeps the soft term's gradients on the scale of the hard one's)."""

    teacher: nn.Module
    alpha: float
    temperature: float
    scale: torch.Tensor  # per channel: the teacher's input = the student's x scale + shift
    shift: torch.Tensor

    @classmethod
    def of(
        cls,
        teacher: nn.Module,
        teacher_sees: Preprocessing,
        student_sees: Preprocessing,
        alpha: float,
        temperature: float,
    ) -> Distillation:
        if not 0 <= alpha <= 1:
            raise UserError(f"distill.alpha={alpha} must be in [0, 1]")
        if temperature <= 0:
            raise UserError(f"distill.temperature={temperature} must be > 0")
        if teacher_sees.input_size != student_sees.input_size:
            raise UserError(
                f"distill.teacher sees {teacher_sees.input_size} px images, the student "
                f"{student_sees.input_size} px: set data.image_size={teacher_sees.input_size}"
            )
        teacher.eval().requires_grad_(False)
        mean_s, std_s = torch.tensor(student_sees.mean), torch.tensor(student_sees.std)
        mean_t, std_t = torch.tensor(teacher_sees.mean), torch.tensor(teacher_sees.std)
        scale = (std_s / std_t).view(1, 3, 1, 1)
        shift = ((mean_s - mean_t) / std_t).view(1, 3, 1, 1)
        return cls(teacher, alpha, temperature, scale, shift)

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)

    def loss(
        self, task_loss: torch.Tensor, student_logits: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images * self.scale + self.shift)
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student_logits.float() / t, dim=-1),
            F.log_softmax(teacher_logits.float() / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return (1 - self.alpha) * task_loss + self.alpha * t * t * soft
