"""Batch collation, with Mixup/CutMix drawn deterministically per global batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from timm.data.mixup import mixup_target

from .data import UNLABELED
from .views import ViewKey, mix_generator


class DistillationCollator:
    """Stack `{"pixel_values", "labels"}` examples into a batch, mixing images and labels when enabled.

    Without mixing, labels stay class indices `(B,)` and the loss applies label smoothing. With mixing
    (`mixup_alpha > 0` or `cutmix_alpha > 0`), images are mixed in the batch and labels become soft `(B, C)`
    float targets that already include `label_smoothing`, as in the DeiT recipe (mixup 0.8, cutmix 1.0,
    switch 0.5, smoothing 0.1). The teacher must see the same mixed images, so mixing happens here, before
    the model and the teacher.

    The mixing follows timm's `Mixup(mode="batch")`: one draw per batch of whether to mix, Mixup or CutMix,
    lambda ~ Beta(alpha, alpha) and one CutMix box (lambda corrected to the box's area). Two things differ, so
    that a run does not depend on its layout over processes and workers (see `deit_distill.training.views`):
    - the draw comes from the examples' `ViewKey`s (seed, epoch, global batch), not from NumPy's global state;
    - examples are mixed with their neighbour (0 with 1, 2 with 3, ...) rather than with their mirror in the
      batch, so a per-process slice of a global batch is mixed exactly as in a single process. In an odd batch
      the last example stays unmixed, with a one-hot (smoothed) target.
    timm's `Mixup` cannot take a generator or a pairing, hence this short re-implementation of its batch mode.

    Unlabelled images (label `UNLABELED`) keep that label without mixing; with mixing their soft target is all
    zeros, so an image mixed from a labelled and an unlabelled one has only the labelled part of the target
    (mass `lam` or `1 - lam`), and the loss's label term weighs it by that mass.

    Args:
        num_classes: Number of classes, the width of the soft targets.
        mixup_alpha: Beta(alpha, alpha) parameter of mixup; 0 disables it.
        cutmix_alpha: Beta(alpha, alpha) parameter of cutmix; 0 disables it.
        prob: Probability of mixing a batch.
        switch_prob: Probability of cutmix instead of mixup when both are enabled.
        label_smoothing: Smoothing of the mixed targets (ignored when mixing is disabled).
    """

    accepts_views = True

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        if min(mixup_alpha, cutmix_alpha) < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError(
                "mixup and cutmix alphas must be >= 0 and the mixing probabilities in [0, 1], got "
                f"mixup {mixup_alpha}, cutmix {cutmix_alpha}, prob {prob}, switch_prob {switch_prob}."
            )
        if (mixup_alpha > 0 or cutmix_alpha > 0) and num_classes is None:
            raise ValueError("Mixup/CutMix needs num_classes to build the soft targets.")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    @property
    def mixes(self) -> bool:
        """Whether this collator mixes batches (and so returns soft labels)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def for_eval(self) -> DistillationCollator:
        """A collator that only stacks, for evaluation."""
        return DistillationCollator()

    def mix_params(
        self, generator: np.random.Generator, image_hw: tuple[int, int]
    ) -> tuple[float, tuple | None]:
        """One batch's draw: `(lam, box)`, where `box` is `(y0, y1, x0, x1)` for CutMix and `None` for Mixup.

        `lam` is 1.0 when the batch is not mixed. The order of draws is timm's `Mixup._params_per_batch`.
        """
        if not self.mixes or generator.random() >= self.prob:
            return 1.0, None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(generator.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(generator.beta(alpha, alpha))
        if not use_cutmix:
            return lam, None
        # timm's `rand_bbox` (margin 0) and `correct_lam`: a box of area ~(1 - lam), clipped at the border.
        height, width = image_hw
        ratio = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(generator.integers(0, height)), int(generator.integers(0, width))
        y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height).tolist()
        x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width).tolist()
        return 1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1)

    def __call__(
        self, examples: list[dict[str, Any]], views: Sequence[ViewKey | None] | None = None
    ) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        if all("labels" not in example for example in examples):
            return {"pixel_values": pixel_values}  # unlabelled data for prediction: nothing to mix or smooth
        labels = torch.as_tensor([example["labels"] for example in examples], dtype=torch.long)
        if not self.mixes:
            return {"pixel_values": pixel_values, "labels": labels}
        if not views or views[0] is None:
            raise ValueError(
                "Mixup/CutMix draws from the batch's ViewKeys: train with DistillationTrainer (its sampler "
                "provides them) or pass views=[ViewKey, ...]."
            )
        lam, box = self.mix_params(mix_generator(views[0]), tuple(pixel_values.shape[-2:]))
        # One-hot smoothed targets; they stay for unmixed batches and for the last example of an odd batch.
        unlabeled = labels == UNLABELED
        targets = mixup_target(labels.clamp(min=0), self.num_classes, smoothing=self.label_smoothing)
        targets[unlabeled] = 0.0
        if lam == 1.0:
            return {"pixel_values": pixel_values, "labels": targets}
        partner = torch.arange(len(examples)) ^ 1
        partner[partner == len(examples)] = len(examples) - 1
        if box is None:
            pixel_values = pixel_values * lam + pixel_values[partner] * (1.0 - lam)
        else:
            y0, y1, x0, x1 = box
            pixel_values[:, :, y0:y1, x0:x1] = pixel_values[partner, :, y0:y1, x0:x1]
        return {"pixel_values": pixel_values, "labels": targets * lam + targets[partner] * (1.0 - lam)}
