"""The DeiT training loss: supervised cross-entropy on the CLS head plus distillation on the DIST head.

Modelled on facebookresearch/deit `losses.py`, with one difference: the loss does not hold the teacher.
The trainer runs the frozen teacher on the same (mixed) batch and passes its logits in, so the loss stays a
pure function of tensors and the teacher's device, precision and preprocessing are the trainer's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import UNLABELED

DISTILLATION_TYPES = ("none", "soft", "hard")
KL_REDUCTIONS = ("numel", "batchmean")


@dataclass
class DistillationLossOutput:
    """What `DistillationLoss` returns.

    Args:
        loss: The value to backpropagate, `(1 - w) * base_loss + w * distillation_loss`, where `w` is `alpha`
            for "soft"/"hard", 0.5 for "none" on a model with a distillation head, and 0 otherwise.
        base_loss: Cross-entropy of the CLS head (or the single head) with the labels. Detached, for logging.
        distillation_loss: The term on the distillation head (or on the single head without one): `tau^2 * KL`
            for "soft", cross-entropy with the teacher's argmax for "hard", cross-entropy with the labels for
            "none" on a two-head model, and 0 for "none" on a single-head model. Detached, for logging.
    """

    loss: torch.Tensor
    base_loss: torch.Tensor
    distillation_loss: torch.Tensor


class DistillationLoss(nn.Module):
    """DeiT loss (Touvron et al. 2021, eq. 2 and 3), with the teacher's logits passed to `forward`.

    - "none": `CE(Z_cls, y)`. On a model with a distillation head, that head is trained on the labels too and
      the loss is `(CE(Z_cls, y) + CE(Z_dist, y)) / 2`: every parameter then gets a gradient, so DDP needs no
      `find_unused_parameters`, and the distillation head still learns the task.
    - "soft": `(1 - alpha) * CE(Z_cls, y) + alpha * tau^2 * KL(softmax(Z_t / tau) || softmax(Z_dist / tau))`.
    - "hard": `(1 - alpha) * CE(Z_cls, y) + alpha * CE(Z_dist, argmax Z_t)`, without label smoothing on the
      teacher's labels.

    On a model without a distillation token both terms use the single head ("usual distillation").

    Args:
        distillation_type: "none", "soft" or "hard".
        alpha: Weight of the distillation term, in [0, 1].
        tau: Temperature of soft distillation, > 0.
        kl_reduction: How the soft KL is normalised. "numel" (default) sums the KL over batch and classes and
            divides by batch * classes, as the official DeiT code does; the paper's numbers and the official
            recipe (alpha 0.5, tau 1) were obtained with it. "batchmean" divides by the batch size only, the
            mathematically standard KL, which is exactly `num_classes` times larger, so it weighs the
            distillation term much more at the same alpha.
        label_smoothing: Smoothing of the base cross-entropy when labels are class indices. Soft `(B, C)`
            labels (from mixup/cutmix, which already smooth them) are used as they are.

    Unlabelled images (label `UNLABELED`, or an all-zero soft target) have no label term: the batch's label
    cross-entropy sums over the labelled images and divides by the whole batch, so each image's loss is the
    paper's, with the label term of an unlabelled one masked, and a batch of labelled images alone is unchanged.
    They need a teacher: their distillation term is all they train (with "none" they contribute nothing).
    """

    def __init__(
        self,
        distillation_type: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
        kl_reduction: str = "numel",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(
                f"distillation_type must be one of {DISTILLATION_TYPES}, got {distillation_type!r}."
            )
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if not tau > 0.0:
            raise ValueError(f"tau must be > 0, got {tau}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        self.kl_reduction = kl_reduction
        self.label_smoothing = label_smoothing

    def forward(
        self,
        student_outputs: Any,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> DistillationLossOutput:
        """Compute the loss.

        Args:
            student_outputs: The student's output: an object with `cls_logits` and `distillation_logits`
                (the latter `None` without a distillation token), any object with `logits`, or a tensor.
            labels: Class indices `(B,)`, or soft targets `(B, C)` from mixup/cutmix.
            teacher_logits: `(B, C)` logits of the frozen teacher on the same batch; required for "soft" and
                "hard", ignored for "none".
        """
        cls_logits, dist_logits = _student_heads(student_outputs)
        # Softmax, log and sums over many classes lose precision in bf16/fp16.
        cls_logits = cls_logits.float()
        base_loss = self._cross_entropy(cls_logits, labels)

        if self.distillation_type == "none":
            if dist_logits is None:
                return DistillationLossOutput(base_loss, base_loss.detach(), torch.zeros_like(base_loss))
            dist_loss = self._cross_entropy(dist_logits.float(), labels)
            return self._combine(base_loss, dist_loss, weight=0.5)

        if teacher_logits is None:
            raise ValueError(
                f"distillation_type={self.distillation_type!r} needs teacher_logits: run the teacher on the same "
                "batch and pass its logits, or use distillation_type='none' to train without a teacher."
            )
        # Without a distillation token, "usual distillation" puts both terms on the one head.
        student_logits = cls_logits if dist_logits is None else dist_logits.float()
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits has shape {tuple(teacher_logits.shape)} ({teacher_logits.shape[-1]} classes) but "
                f"the student's logits have shape {tuple(student_logits.shape)} ({student_logits.shape[-1]} "
                "classes); the teacher must be fine-tuned on the same label space and batch as the student."
            )
        teacher_logits = teacher_logits.detach().float()

        if self.distillation_type == "soft":
            kl = F.kl_div(
                F.log_softmax(student_logits / self.tau, dim=-1),
                F.log_softmax(teacher_logits / self.tau, dim=-1),
                reduction="sum",
                log_target=True,
            )
            denominator = student_logits.numel() if self.kl_reduction == "numel" else student_logits.shape[0]
            dist_loss = kl * (self.tau**2) / denominator
        else:
            dist_loss = F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
        return self._combine(base_loss, dist_loss, weight=self.alpha)

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        if labels.is_floating_point():
            if labels.shape != logits.shape:
                raise ValueError(
                    f"soft labels have shape {tuple(labels.shape)} but the logits have shape "
                    f"{tuple(logits.shape)}; build mixup targets with num_classes={logits.shape[-1]}."
                )
            return F.cross_entropy(logits, labels.float())
        # A sum over the labelled images divided by the whole batch (the mean when all are labelled), without a
        # data-dependent branch that would synchronise a GPU.
        total = F.cross_entropy(
            logits,
            labels.long(),
            label_smoothing=self.label_smoothing,
            ignore_index=UNLABELED,
            reduction="sum",
        )
        return total / labels.numel()

    @staticmethod
    def _combine(base_loss: torch.Tensor, dist_loss: torch.Tensor, weight: float) -> DistillationLossOutput:
        loss = (1.0 - weight) * base_loss + weight * dist_loss
        return DistillationLossOutput(loss, base_loss.detach(), dist_loss.detach())


def _student_heads(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return `(cls_logits, distillation_logits or None)` from a model output or a tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs, None
    cls_logits = getattr(outputs, "cls_logits", None)
    if cls_logits is not None:
        return cls_logits, getattr(outputs, "distillation_logits", None)
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise TypeError(
            f"student_outputs of type {type(outputs).__name__} has neither `cls_logits` nor `logits`; pass the "
            "model output or a logits tensor."
        )
    return logits, None
