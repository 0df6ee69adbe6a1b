"""Batch collation, with Mixup/CutMix drawn deterministically per global batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from timm.data.mixup import mixup_target

from .data import UNLABELED
from .device_augment import DeviceAugmentSpec, collate_params, mix_pixels, stack_canvases
from .views import AUGMENT_PARAMS, ViewKey, mix_generator


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
        device_augment: With `--augment_on device`, the recipe's spec: examples then carry uint8 canvases and
            their parameters (`DecodeForDevice`), the batch keeps them (`pixel_values` uint8 `(B, Hc, Wc, 3)`,
            `augment_params`) plus this batch's mix draw, and the trainer augments and mixes on the device
            (`device_augment.augment_batch`). The soft labels are mixed here, on the host, as on the worker path.
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
        device_augment: DeviceAugmentSpec | None = None,
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
        self.device_augment = device_augment

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
        on_device = AUGMENT_PARAMS in examples[0]
        if on_device and self.device_augment is None:
            raise ValueError("Examples decoded for --augment_on device need a collator with device_augment.")
        if on_device:
            pixel_values = stack_canvases(
                [e["pixel_values"] for e in examples], self.device_augment.canvas_hw
            )
        else:
            pixel_values = torch.stack([example["pixel_values"] for example in examples])
        if all("labels" not in example for example in examples):
            return {"pixel_values": pixel_values}  # unlabelled data for prediction: nothing to mix or smooth
        labels = torch.as_tensor([example["labels"] for example in examples], dtype=torch.long)
        image_hw = self.device_augment.output_hw if on_device else tuple(pixel_values.shape[-2:])
        if not self.mixes:
            if on_device:
                params = [example[AUGMENT_PARAMS] for example in examples]
                augment = collate_params(params, self.device_augment, (1.0, None))
                return {"pixel_values": pixel_values, "labels": labels, AUGMENT_PARAMS: augment}
            return {"pixel_values": pixel_values, "labels": labels}
        if not views or views[0] is None:
            raise ValueError(
                "Mixup/CutMix draws from the batch's ViewKeys: train with DistillationTrainer (its sampler "
                "provides them) or pass views=[ViewKey, ...]."
            )
        lam, box = self.mix_params(mix_generator(views[0]), image_hw)
        # One-hot smoothed targets; they stay for unmixed batches and for the last example of an odd batch.
        unlabeled = labels == UNLABELED
        targets = mixup_target(labels.clamp(min=0), self.num_classes, smoothing=self.label_smoothing)
        targets[unlabeled] = 0.0
        if on_device:
            # The pixels are mixed on the device after augmentation (`augment_batch`); the draw travels along.
            params = [example[AUGMENT_PARAMS] for example in examples]
            augment = collate_params(params, self.device_augment, (lam, box))
            batch = {"pixel_values": pixel_values, AUGMENT_PARAMS: augment}
        else:
            batch = {"pixel_values": pixel_values if lam == 1.0 else mix_pixels(pixel_values, lam, box)}
        if lam == 1.0:
            return {**batch, "labels": targets}
        partner = torch.arange(len(examples)) ^ 1
        partner[partner == len(examples)] = len(examples) - 1
        return {**batch, "labels": targets * lam + targets[partner] * (1.0 - lam)}
