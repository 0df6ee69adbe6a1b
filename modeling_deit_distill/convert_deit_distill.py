"""Bit-exact weight conversion between this model, transformers' DeiT/ViT and timm's ViT/DeiT.

Each source format has one table of `_Rule`s mapping its parameter names to ours. A table serves both
directions: importing renames source keys to ours (and concatenates q/k/v into our fused `qkv_proj`); exporting
renames ours to whichever alternative name the target model actually has (and splits `qkv_proj`).

Supported sources and what they become:

| source | ours |
|---|---|
| transformers `DeiTForImageClassificationWithTeacher`, timm `VisionTransformerDistilled` | DIST token, two heads, `inference_head="average"` |
| transformers `DeiTForImageClassification` | DIST token in the sequence, `inference_head="cls"` (see below) |
| transformers `ViTForImageClassification`, timm `VisionTransformer` | no DIST token, one head |

transformers' `DeiTForImageClassification` keeps the distillation token in its sequence (it changes the CLS
output through attention) but has no head on it. It converts to our model *with* the token and
`inference_head="cls"`, so `logits` equal the source's exactly; our DIST head starts as a copy of the CLS head,
a deterministic starting point for distillation fine-tuning.

This module imports only torch and transformers; timm models are read through `state_dict()` and attributes.
Converted models are returned in eval mode, on the source's device and dtype.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

from .configuration_deit_distill import DeiTDistillConfig
from .modeling_deit_distill import DeiTDistillForImageClassification

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class _Rule:
    """Source names (alternatives, e.g. transformers 5.x then 4.x) of one of our parameters.

    Placeholders: `{b}` the backbone prefix (`deit` or `vit`), `{i}` a block index, `{p}` `weight` or `bias`.
    `part` is the q/k/v row block of our fused `qkv_proj`; `target=None` marks weights that are dropped.
    """

    sources: tuple[str, ...]
    target: str | None
    part: int | None = None


_PLACEHOLDERS = {"{b}": r"(?P<b>deit|vit)", "{i}": r"(?P<i>\d+)", "{p}": r"(?P<p>weight|bias)"}


@functools.cache
def _pattern(template: str) -> re.Pattern[str]:
    regex = re.escape(template)
    for placeholder, group in _PLACEHOLDERS.items():
        regex = regex.replace(re.escape(placeholder), group)
    return re.compile(regex)


def _fill(template: str, fields: Mapping[str, str]) -> str:
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value)
    return template


# transformers 5.x names first (used for export), 4.x names second.
_TRANSFORMERS_RULES = (
    _Rule(("{b}.embeddings.cls_token",), "deit.embeddings.cls_token"),
    _Rule(("{b}.embeddings.distillation_token",), "deit.embeddings.distillation_token"),
    _Rule(("{b}.embeddings.position_embeddings",), "deit.embeddings.position_embeddings"),
    _Rule(
        ("{b}.embeddings.patch_embeddings.projection.{p}",), "deit.embeddings.patch_embeddings.projection.{p}"
    ),
    _Rule(
        ("{b}.layers.{i}.layernorm_before.{p}", "{b}.encoder.layer.{i}.layernorm_before.{p}"),
        "deit.layers.{i}.layernorm_before.{p}",
    ),
    _Rule(
        ("{b}.layers.{i}.attention.q_proj.{p}", "{b}.encoder.layer.{i}.attention.attention.query.{p}"),
        "deit.layers.{i}.attention.qkv_proj.{p}",
        part=0,
    ),
    _Rule(
        ("{b}.layers.{i}.attention.k_proj.{p}", "{b}.encoder.layer.{i}.attention.attention.key.{p}"),
        "deit.layers.{i}.attention.qkv_proj.{p}",
        part=1,
    ),
    _Rule(
        ("{b}.layers.{i}.attention.v_proj.{p}", "{b}.encoder.layer.{i}.attention.attention.value.{p}"),
        "deit.layers.{i}.attention.qkv_proj.{p}",
        part=2,
    ),
    _Rule(
        ("{b}.layers.{i}.attention.o_proj.{p}", "{b}.encoder.layer.{i}.attention.output.dense.{p}"),
        "deit.layers.{i}.attention.o_proj.{p}",
    ),
    _Rule(
        ("{b}.layers.{i}.layernorm_after.{p}", "{b}.encoder.layer.{i}.layernorm_after.{p}"),
        "deit.layers.{i}.layernorm_after.{p}",
    ),
    _Rule(
        ("{b}.layers.{i}.mlp.fc1.{p}", "{b}.encoder.layer.{i}.intermediate.dense.{p}"),
        "deit.layers.{i}.mlp.fc1.{p}",
    ),
    _Rule(
        ("{b}.layers.{i}.mlp.fc2.{p}", "{b}.encoder.layer.{i}.output.dense.{p}"),
        "deit.layers.{i}.mlp.fc2.{p}",
    ),
    _Rule(("{b}.layernorm.{p}",), "deit.layernorm.{p}"),
    # `classifier` is the single head of DeiTForImageClassification and ViTForImageClassification.
    _Rule(("cls_classifier.{p}", "classifier.{p}"), "cls_classifier.{p}"),
    _Rule(("distillation_classifier.{p}",), "distillation_classifier.{p}"),
    # The pooler of a base DeiTModel/ViTModel feeds no classification logits.
    _Rule(("{b}.pooler.dense.{p}",), None),
)

# Official facebookresearch/deit and timm `deit_*` / `vit_*` checkpoints.
_TIMM_RULES = (
    _Rule(("cls_token",), "deit.embeddings.cls_token"),
    _Rule(("dist_token",), "deit.embeddings.distillation_token"),
    _Rule(("pos_embed",), "deit.embeddings.position_embeddings"),
    _Rule(("patch_embed.proj.{p}",), "deit.embeddings.patch_embeddings.projection.{p}"),
    _Rule(("blocks.{i}.norm1.{p}",), "deit.layers.{i}.layernorm_before.{p}"),
    _Rule(("blocks.{i}.attn.qkv.{p}",), "deit.layers.{i}.attention.qkv_proj.{p}"),
    _Rule(("blocks.{i}.attn.proj.{p}",), "deit.layers.{i}.attention.o_proj.{p}"),
    _Rule(("blocks.{i}.norm2.{p}",), "deit.layers.{i}.layernorm_after.{p}"),
    _Rule(("blocks.{i}.mlp.fc1.{p}",), "deit.layers.{i}.mlp.fc1.{p}"),
    _Rule(("blocks.{i}.mlp.fc2.{p}",), "deit.layers.{i}.mlp.fc2.{p}"),
    _Rule(("norm.{p}",), "deit.layernorm.{p}"),
    _Rule(("head.{p}",), "cls_classifier.{p}"),
    _Rule(("head_dist.{p}",), "distillation_classifier.{p}"),
)

# Architecture fields that mean the same in transformers' DeiTConfig/ViTConfig and ours.
_SHARED_CONFIG_FIELDS = (
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "qkv_bias",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "id2label",
    "label2id",
)

_GELU_NAMES = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}


def _import_weights(
    state_dict: StateDict, rules: tuple[_Rule, ...], source: str, fields: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename a source state dict to ours; returns the weights and, per our name, the source name(s)."""
    weights: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    qkv_parts: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        for rule in rules:
            match = next((m for t in rule.sources if (m := _pattern(_fill(t, fields)).fullmatch(key))), None)
            if match is not None:
                break
        else:
            unknown.append(key)
            continue
        if rule.target is None:
            continue
        target = _fill(rule.target, match.groupdict())
        origins[target] = f"{origins[target]}, {key}" if target in origins else key
        if rule.part is None:
            weights[target] = tensor
        else:
            qkv_parts.setdefault(target, {})[rule.part] = tensor
    if unknown:
        raise ValueError(
            f"The {source} state dict has {len(unknown)} key(s) with no counterpart in DeiTDistill: "
            f"{', '.join(unknown)}. The architecture differs (e.g. layer scale, register tokens, qk-norm, "
            "average pooling) and cannot be converted exactly."
        )
    for target, parts in qkv_parts.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(
                f"{source}: query, key and value are all needed for {target}; got {origins[target]}."
            )
        weights[target] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return weights, origins


def _export_weights(
    state_dict: StateDict, rules: tuple[_Rule, ...], target_keys: set[str], fields: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Rename our state dict to the target's names (the alternative the target has), splitting `qkv_proj`."""
    exported: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.target is None:
            continue
        for key, tensor in state_dict.items():
            match = _pattern(rule.target).fullmatch(key)
            if match is None:
                continue
            names = [_fill(t, {**fields, **match.groupdict()}) for t in rule.sources]
            name = next((n for n in names if n in target_keys), None)
            if name is None:
                raise ValueError(
                    f"The target model has no parameter for {key} (looked for {', '.join(names)})."
                )
            exported[name] = tensor if rule.part is None else tensor.chunk(3, dim=0)[rule.part]
    return exported


def _load_checked(
    model: nn.Module, weights: Mapping[str, torch.Tensor], origins: Mapping[str, str], source: str
) -> None:
    """`load_state_dict` with errors that name the missing/extra keys and both shapes of a mismatch."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    extra = sorted(weights.keys() - expected.keys())
    if missing or extra:
        details = []
        if missing:
            details.append(f"missing from the {source} weights: {', '.join(missing)}")
        if extra:
            details.append(
                f"not in the target config: {', '.join(f'{k} ({origins.get(k, k)})' for k in extra)}"
            )
        raise ValueError(
            f"The {source} weights do not fit the target architecture; " + "; ".join(details) + "."
        )
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"Shape mismatch for {key} (from {source} {origins.get(key, key)}): the weights have "
                f"{tuple(tensor.shape)}, the config expects {tuple(expected[key].shape)}. Check image_size, "
                "patch_size and the widths; to change resolution, convert first and then call set_input_size()."
            )
    model.load_state_dict(weights, strict=True)


def _build_ours(config: DeiTDistillConfig, like: torch.Tensor) -> DeiTDistillForImageClassification:
    return DeiTDistillForImageClassification(config).to(device=like.device, dtype=like.dtype).eval()


def _check_distillation_token(config: DeiTDistillConfig, has_token: bool, source: str) -> None:
    if config.use_distillation_token != has_token:
        state = "has a" if has_token else "has no"
        raise ValueError(
            f"The {source} model {state} distillation token but the config sets use_distillation_token="
            f"{config.use_distillation_token}; set it to {has_token} to convert this model."
        )


def from_transformers_state_dict(
    state_dict: StateDict, config: PretrainedConfig
) -> DeiTDistillForImageClassification:
    """Convert a transformers DeiT/ViT image-classification state dict (5.x or 4.x key names) with its config.

    The head layout decides the result: `cls_classifier` + `distillation_classifier` (DeiT with teacher) gives
    `inference_head="average"`; a single `classifier` gives `inference_head="cls"`, keeping the distillation
    token when the embeddings have one (DeiTForImageClassification).
    """
    if not any(key.startswith(("deit.", "vit.")) for key in state_dict):
        raise ValueError(
            "Not the state dict of a transformers DeiT/ViT image classifier (no 'deit.' or 'vit.' keys); a base "
            "DeiTModel/ViTModel has no head to convert."
        )
    backbone = "vit" if any(key.startswith("vit.") for key in state_dict) else "deit"
    weights, origins = _import_weights(state_dict, _TRANSFORMERS_RULES, "transformers", {"b": backbone})
    if "cls_classifier.weight" not in weights:
        raise ValueError(
            "The transformers state dict has no classification head (classifier / cls_classifier); convert a "
            "*ForImageClassification model, not a base DeiTModel/ViTModel."
        )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(
            f"head_dim={head_dim} x {config.num_attention_heads} heads != hidden_size; not supported."
        )
    has_token = "deit.embeddings.distillation_token" in weights
    has_dist_head = "distillation_classifier.weight" in weights
    if has_token and not has_dist_head:
        # DeiTForImageClassification: the DIST token shapes the sequence but only the CLS head is read.
        for name in ("weight", "bias"):
            weights[f"distillation_classifier.{name}"] = weights[f"cls_classifier.{name}"].clone()
    fields = {name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS}
    patch = fields["patch_size"]
    if isinstance(patch, (tuple, list)):
        if patch[0] != patch[1]:
            raise ValueError(f"Only square patches are supported, got patch_size={tuple(patch)}.")
        fields["patch_size"] = patch[0]
    ours = DeiTDistillConfig(
        **fields, use_distillation_token=has_token, inference_head="average" if has_dist_head else "cls"
    )
    model = _build_ours(ours, next(iter(weights.values())))
    _load_checked(model, weights, origins, "transformers")
    return model


def from_transformers_deit(model: PreTrainedModel) -> DeiTDistillForImageClassification:
    """Convert transformers' `DeiTForImageClassificationWithTeacher`, `DeiTForImageClassification` or
    `ViTForImageClassification`; `logits` (and `cls_logits` / `distillation_logits`) match the source's."""
    return from_transformers_state_dict(model.state_dict(), model.config)


def _transformers_config(
    model: DeiTDistillForImageClassification, config_class: type[PretrainedConfig]
) -> Any:
    fields = {name: getattr(model.config, name) for name in _SHARED_CONFIG_FIELDS}
    return config_class(**fields)


def _export_transformers(
    model: DeiTDistillForImageClassification, target: PreTrainedModel, backbone: str
) -> Any:
    weights = _export_weights(
        model.state_dict(), _TRANSFORMERS_RULES, set(target.state_dict()), {"b": backbone}
    )
    _load_checked(target, weights, {}, "DeiTDistill")
    like = model.deit.embeddings.cls_token
    return target.to(device=like.device, dtype=like.dtype).eval()


def to_transformers_deit(model: DeiTDistillForImageClassification) -> DeiTForImageClassificationWithTeacher:
    """Export to transformers' native `DeiTForImageClassificationWithTeacher` (loads without remote code).

    Its `logits` are always the average of both heads; `cls_logits` and `distillation_logits` match ours
    whatever `inference_head` is. Stochastic depth (`drop_path_rate`) has no transformers counterpart.
    """
    if not model.config.use_distillation_token:
        raise ValueError(
            "to_transformers_deit needs a model with a distillation token; export a plain ViT "
            "(use_distillation_token=False) with to_transformers_vit."
        )
    target = DeiTForImageClassificationWithTeacher(_transformers_config(model, DeiTConfig))
    return _export_transformers(model, target, "deit")


def to_transformers_vit(model: DeiTDistillForImageClassification) -> ViTForImageClassification:
    """Export a model without distillation token to transformers' native `ViTForImageClassification`."""
    if model.config.use_distillation_token:
        raise ValueError(
            "to_transformers_vit needs a model without a distillation token (ViT has none); use "
            "to_transformers_deit for this model."
        )
    target = ViTForImageClassification(_transformers_config(model, ViTConfig))
    return _export_transformers(model, target, "vit")


def _timm_model_fields(model: nn.Module) -> dict[str, Any]:
    """Read what a timm VisionTransformer's state dict cannot tell, and reject what we cannot represent."""
    unsupported = {
        f"global_pool={model.global_pool!r} (only 'token')": model.global_pool != "token",
        "no_embed_class=True": getattr(model, "no_embed_class", False),
        "register tokens": getattr(model, "num_reg_tokens", 0) > 0,
        "no class token": not getattr(model, "has_class_token", True),
        "no position embedding": model.pos_embed is None,
    }
    problems = [name for name, present in unsupported.items() if present]
    activation = model.blocks[0].mlp.act
    if not isinstance(activation, nn.GELU):
        problems.append(f"activation {type(activation).__name__} (only GELU)")
    if problems:
        raise ValueError(f"This timm model cannot be converted exactly: {', '.join(problems)}.")
    drop_path = getattr(model.blocks[-1].drop_path1, "drop_prob", 0.0)
    height, width = model.patch_embed.img_size
    return {
        "image_size": height if height == width else [height, width],
        "num_attention_heads": model.blocks[0].attn.num_heads,
        "layer_norm_eps": model.norm.eps,
        "hidden_act": _GELU_NAMES[activation.approximate],
        "drop_path_rate": drop_path,
    }


def _timm_state_dict_fields(state_dict: StateDict) -> dict[str, Any]:
    """Architecture fields readable from the shapes of a timm state dict."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise ValueError(f"Not a timm ViT/DeiT state dict: {key!r} is missing.")
    if "head.weight" not in state_dict:
        raise ValueError(
            "The timm state dict has no classifier ('head.weight'); it was built with num_classes=0."
        )
    patch = state_dict["patch_embed.proj.weight"]
    if patch.shape[-1] != patch.shape[-2]:
        raise ValueError(f"Only square patches are supported, got {tuple(patch.shape[-2:])}.")
    has_token = "dist_token" in state_dict
    fields: dict[str, Any] = {
        "hidden_size": state_dict["cls_token"].shape[-1],
        "num_hidden_layers": len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
        "patch_size": patch.shape[-1],
        "num_channels": patch.shape[1],
        "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "num_labels": state_dict["head.weight"].shape[0],
        "use_distillation_token": has_token,
        "inference_head": "average" if has_token else "cls",
    }
    num_patches = state_dict["pos_embed"].shape[1] - (2 if has_token else 1)
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        fields["image_size"] = side * fields["patch_size"]
    return fields


def from_timm(
    model_or_state_dict: nn.Module | StateDict, *, config: DeiTDistillConfig | None = None, **overrides: Any
) -> DeiTDistillForImageClassification:
    """Convert a timm `VisionTransformerDistilled` / `VisionTransformer` (`deit_*`, `vit_*`) or its state dict.

    The architecture is read from the model's attributes, or from the state dict's shapes; a state dict does
    not tell the head count (pass `num_attention_heads=`), nor a non-square image size (pass `image_size=`).
    `config` replaces the inference entirely; `overrides` (e.g. `id2label`, `layer_norm_eps`) adjust either.
    Our `logits` equal timm's eval output (the average of both heads for the distilled model).
    """
    is_module = isinstance(model_or_state_dict, nn.Module)
    state_dict = model_or_state_dict.state_dict() if is_module else model_or_state_dict
    fields = _timm_state_dict_fields(state_dict)
    if config is None:
        if is_module:
            fields.update(_timm_model_fields(model_or_state_dict))
        if "id2label" in overrides:
            # transformers lets num_labels win over a disagreeing id2label; the labels the caller gave must win.
            del fields["num_labels"]
            fields["label2id"] = {label: index for index, label in overrides["id2label"].items()}
        fields.update(overrides)
        for name in ("num_attention_heads", "image_size"):
            if name not in fields:
                raise ValueError(
                    f"{name} cannot be inferred from a timm state dict; pass {name}=... "
                    "(DeiT-Ti/S/B use 3/6/12 heads), or pass the timm model itself."
                )
        config = DeiTDistillConfig(**fields)
    elif overrides:
        config = DeiTDistillConfig(**{**config.to_dict(), **overrides})
    _check_distillation_token(config, fields["use_distillation_token"], "timm")
    weights, origins = _import_weights(state_dict, _TIMM_RULES, "timm", {})
    model = _build_ours(config, next(iter(weights.values())))
    _load_checked(model, weights, origins, "timm")
    return model


__all__ = [
    "from_timm",
    "from_transformers_deit",
    "from_transformers_state_dict",
    "to_transformers_deit",
    "to_transformers_vit",
]
