"""Which parameters get weight decay, and layer-wise learning-rate decay, for the Trainer's optimizer.

Both follow timm's optimizer factory, so a model with timm's API (`no_weight_decay`, `group_matcher`) is grouped
here exactly as timm would group it.
"""

from __future__ import annotations

from typing import Any

from timm.optim import param_groups_layer_decay
from torch import nn


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Parameters trained without weight decay (the DeiT recipe, and timm's `weight_decay_exclude_1d`).

    Every parameter with fewer than two dimensions (norm weights, biases), plus the names the model lists in
    `no_weight_decay()` (timm's contract: the matrices to exempt, e.g. the CLS/DIST tokens and position
    embedding).
    """
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return listed | {name for name, param in model.named_parameters() if param.ndim <= 1}


def layer_decay_param_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """Optimizer groups with layer-wise lr decay (BEiT, MAE, DeiT III fine-tuning), built by timm's helper.

    Block `i` of `L` trains at `learning_rate * layer_decay ** (L + 1 - (i + 1))`: the heads (and the final norm)
    at the full rate, the embeddings at the smallest. The model's `group_matcher()` assigns the layers; the
    decay/no-decay split is `no_decay_parameter_names`. Each group carries its own `lr`, which the Trainer's
    schedulers scale as usual, and timm's `lr_scale`.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}; 0.65-0.75 is usual for ViTs.")
    if not hasattr(model, "group_matcher"):
        raise ValueError(
            f"Layer-wise lr decay needs a model with timm's group_matcher(); {type(model).__name__} has none."
        )
    groups = param_groups_layer_decay(
        model,
        weight_decay=weight_decay,
        no_weight_decay_list=sorted(no_decay_parameter_names(model)),
        layer_decay=layer_decay,
    )
    for group in groups:
        group["lr"] = learning_rate * group["lr_scale"]
    return groups
