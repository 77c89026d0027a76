"""Knowledge distillation as DeiT trains with it (Touvron et al. 2021, its DistillationLoss): the student's
loss is (1 - alpha) * its usual loss + alpha * a distillation term against a frozen teacher's logits.

- 'soft': KL(teacher / tau || student / tau) * tau^2, summed and divided by the number of logits (batch x
  classes), as DeiT computes it;
- 'hard': cross-entropy against the teacher's argmax.
Our students have no distillation token: the one classifier output takes both terms, which is what DeiT's
loss does with a model that returns a single output.
"""
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

DISTILL_MODES = ("soft", "hard")


def distillation_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str,
                      tau: float = 1.0) -> torch.Tensor:
    """The distillation term of logits (B, C) of the student and the teacher -> scalar."""
    if mode == "soft":
        kl = F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                      reduction="sum", log_target=True)
        return kl * (tau * tau) / student_logits.numel()
    if mode == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
    raise ValueError(f"distill must be one of {DISTILL_MODES}, got {mode!r}")


class DistillationLoss(nn.Module):
    """base_loss(student(x), targets) mixed with the distillation term against `teacher(x)`.

    The teacher is held in eval mode with frozen weights and is not a submodule (it is never trained, moved
    by the loop or saved with the student); images are resized to `teacher_size` when it differs.
    """

    def __init__(self, base_loss: Callable, teacher: nn.Module, mode: str, alpha: float = 0.5, tau: float = 1.0,
                 teacher_size: int = 0):
        super().__init__()
        if mode not in DISTILL_MODES:
            raise ValueError(f"distill must be one of {DISTILL_MODES}, got {mode!r}")
        self.base_loss, self.mode, self.alpha, self.tau, self.teacher_size = base_loss, mode, alpha, tau, teacher_size
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)   # outside the module tree on purpose

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, C) of images (B, C, H, W), in float32."""
        self.teacher.eval()
        if self.teacher_size and images.shape[-1] != self.teacher_size:
            images = F.interpolate(images, size=(self.teacher_size, self.teacher_size), mode="bilinear",
                                   align_corners=False)
        return self.teacher(images).float()

    def forward(self, images: torch.Tensor, student_logits: torch.Tensor,
                targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """-> {'loss', 'base_loss', 'distill_loss'} (scalars) for a batch of images, the student's logits (B, C)
        and the targets the base loss takes (labels (B,) or soft targets (B, C))."""
        base = self.base_loss(student_logits, targets)
        distill = distillation_term(student_logits.float(), self.teacher_logits(images), self.mode, self.tau)
        return {"loss": (1 - self.alpha) * base + self.alpha * distill, "base_loss": base.detach(),
                "distill_loss": distill.detach()}
