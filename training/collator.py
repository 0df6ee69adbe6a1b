"""Batch collation, with optional Mixup/CutMix through `timm.data.Mixup`."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target


class DistillationCollator:
    """Stack `{"pixel_values", "labels"}` examples into a batch, mixing images and labels when enabled.

    Without mixing, labels stay class indices `(B,)` and the loss applies label smoothing. With mixing
    (`mixup_alpha > 0` or `cutmix_alpha > 0`), images are mixed in the batch and labels become soft `(B, C)`
    float targets that already include `label_smoothing`, as in the DeiT recipe (mixup 0.8, cutmix 1.0,
    switch 0.5, smoothing 0.1). The teacher must see the same mixed images, so mixing happens here, before
    the model and the teacher.

    timm mixes an image with its mirror in the batch and needs an even batch: in an odd batch (the last one
    without `drop_last`), the last example is left unmixed with a one-hot (smoothed) target.

    Args:
        num_classes: Number of classes, the width of the soft targets.
        mixup_alpha: Beta(alpha, alpha) parameter of mixup; 0 disables it.
        cutmix_alpha: Beta(alpha, alpha) parameter of cutmix; 0 disables it.
        prob: Probability of mixing a batch.
        switch_prob: Probability of cutmix instead of mixup when both are enabled.
        label_smoothing: Smoothing of the mixed targets (ignored when mixing is disabled).
    """

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
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            if num_classes is None:
                raise ValueError("Mixup/CutMix needs num_classes to build the soft targets.")
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=prob,
                switch_prob=switch_prob,
                mode="batch",
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )

    @property
    def mixes(self) -> bool:
        """Whether this collator mixes batches (and so returns soft labels)."""
        return self.mixup is not None

    def for_eval(self) -> DistillationCollator:
        """A collator that only stacks, for evaluation."""
        return DistillationCollator()

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.as_tensor([example["labels"] for example in examples], dtype=torch.long)
        if self.mixup is None:
            return {"pixel_values": pixel_values, "labels": labels}

        # One-hot smoothed targets; they stay for the unmixed last example of an odd batch.
        targets = mixup_target(labels, self.mixup.num_classes, smoothing=self.mixup.label_smoothing)
        even = len(examples) - len(examples) % 2
        if even:
            # Mixup works in place on the view, so the mixed images land in `pixel_values`.
            _, targets[:even] = self.mixup(pixel_values[:even], labels[:even])
        return {"pixel_values": pixel_values, "labels": targets}
