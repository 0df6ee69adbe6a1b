"""The model a run trains, and its preprocessing: from scratch or from any checkpoint (`checkpoints.py`)."""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    build_image_processor,
)

from .arguments import ModelArguments
from .checkpoints import StartingPoint, load_starting_point
from .errors import UserError
from .transforms import normalisation, output_size

logger = logging.getLogger(__name__)

STUDENT_DROP_PATH_RATE = 0.1
DEFAULT_CROP_PCT = 0.875
# A ResNet-18 (11M parameters) unless --config_overrides says otherwise: transformers' default ResNetConfig is a
# ResNet-50 layout, which with basic blocks comes to 340M parameters.
RESNET_TEACHER_DEFAULTS = {
    "layer_type": "basic",
    "embedding_size": 64,
    "hidden_sizes": [64, 128, 256, 512],
    "depths": [2, 2, 2, 2],
}


@dataclass
class BuiltModel:
    model: nn.Module
    image_processor: BaseImageProcessor
    starting_point: StartingPoint | None  # None: from scratch


def build_model(model_args: ModelArguments, id2label: dict[int, str]) -> BuiltModel:
    """The model to train for these labels and its image processor, from scratch or from a checkpoint."""
    if model_args.model_name_or_path:
        return _from_checkpoint(model_args, id2label)
    label_kwargs = {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {name: index for index, name in id2label.items()},
    }
    model = _scratch_model(model_args, label_kwargs)
    processor = build_image_processor(
        model.config,
        crop_pct=_or(model_args.crop_pct, DEFAULT_CROP_PCT),
        image_mean=_normalisation(model_args.image_mean, "image_mean") or IMAGENET_DEFAULT_MEAN,
        image_std=_normalisation(model_args.image_std, "image_std") or IMAGENET_DEFAULT_STD,
    )
    return BuiltModel(model, processor, None)


def check_model_arguments(model_args: ModelArguments) -> None:
    """Build a from-scratch model's config and layout on the meta device (no memory, no time), so that a bad
    --variant, --config_overrides, --image_size or --attn_implementation is one line before any data loads."""
    _normalisation(model_args.image_mean, "image_mean")
    _normalisation(model_args.image_std, "image_std")
    if model_args.model_name_or_path:
        return
    with torch.device("meta"):
        model = _scratch_model(model_args, {"num_labels": 2})
        size = model.config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        try:  # shapes only: a layout whose layers do not fit together fails here, not at the first step
            model(pixel_values=torch.empty(1, model.config.num_channels, height, width))
        except (RuntimeError, ValueError) as error:
            raise _model_flags_error(error, model_args) from error


def _scratch_model(model_args: ModelArguments, label_kwargs: dict[str, Any]) -> nn.Module:
    overrides = parse_config_overrides(model_args.config_overrides)
    resnet = model_args.architecture == "resnet"
    if resnet and model_args.drop_path_rate is not None:
        raise UserError("--drop_path_rate: transformers' ResNet has no stochastic depth; leave it unset.")
    if resnet and model_args.attn_implementation:
        raise UserError("--attn_implementation: a ResNet has no attention; leave it unset.")
    _check_override_names(overrides, ResNetConfig if resnet else DeiTDistillConfig)
    try:
        if resnet:
            layout = {**RESNET_TEACHER_DEFAULTS, **overrides}
            if len(layout["hidden_sizes"]) != len(layout["depths"]):  # one width and one depth per stage
                raise UserError(
                    f"--config_overrides: hidden_sizes has {len(layout['hidden_sizes'])} stages and depths "
                    f"{len(layout['depths'])}; give both one entry per stage."
                )
            config = ResNetConfig(**layout, **label_kwargs)
            config.image_size = model_args.image_size or 224
            return ResNetForImageClassification(config)
        use_token = model_args.use_distillation_token
        fields = {
            "drop_path_rate": _or(model_args.drop_path_rate, STUDENT_DROP_PATH_RATE),
            "use_distillation_token": use_token,
            "inference_head": "average" if use_token else "cls",
            **({"image_size": model_args.image_size} if model_args.image_size else {}),
            **overrides,
            **label_kwargs,
        }
        config = DeiTDistillConfig.from_variant(model_args.variant, **fields)
        return DeiTDistillForImageClassification._from_config(
            config, attn_implementation=model_args.attn_implementation or "sdpa"
        )
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise _model_flags_error(error, model_args) from error


# Config keys that a run sets itself (labels) or that describe a saved file, not the architecture.
_NOT_OVERRIDABLE = {
    "_name_or_path",
    "architectures",
    "transformers_version",
    "model_type",
    "id2label",
    "label2id",
}


def _check_override_names(overrides: dict[str, Any], config_class: type) -> None:
    """A misspelt key would be stored as an extra config field and change nothing: refuse it, naming the nearest."""
    known = sorted(set(config_class().to_dict()) - _NOT_OVERRIDABLE)
    for key in overrides:
        if key in _NOT_OVERRIDABLE:
            raise UserError(f"--config_overrides {key}: set by the run itself, not an architecture field.")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the fields are {', '.join(known)}."
            raise UserError(
                f"--config_overrides: unknown config field {key!r} of {config_class.__name__}; {hint}"
            )


def _model_flags_error(error: BaseException, model_args: ModelArguments) -> UserError:
    """One line for a model these flags cannot build, naming the flags that shape it."""
    # A validator's error ends with its reason ("...:\n    ValueError: hidden_size (30) must be divisible by ..."):
    # keep the reason, without the validator's framing or the exception's name.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    message = re.sub(r"^[A-Za-z]+Error: ", "", lines[-1])
    if "attn_implementation" in message:
        return UserError(f"--attn_implementation {model_args.attn_implementation}: {message}")
    if message.startswith("Unknown DeiT variant"):
        return UserError(f"--variant {model_args.variant}: {message}")
    given = [
        f"--{name} {value}"
        for name in ("architecture", "variant", "image_size", "config_overrides")
        if (value := getattr(model_args, name, None)) not in (None, "")
        and not (name == "variant" and model_args.architecture == "resnet")
    ]
    return UserError(f"no model can be built from {' '.join(given)}: {message}")


def _from_checkpoint(model_args: ModelArguments, id2label: dict[int, str]) -> BuiltModel:
    if model_args.config_overrides:
        raise UserError(
            "--config_overrides shapes a model built from scratch; a checkpoint keeps its architecture. Drop "
            "one of --config_overrides and --model_name_or_path."
        )
    if not model_args.use_distillation_token:
        raise UserError(
            "--use_distillation_token false applies to a student built from scratch; a checkpoint keeps its "
            "tokens. Drop it, or start from a ViT checkpoint (no distillation token)."
        )
    start = load_starting_point(
        model_args.model_name_or_path,
        id2label,
        require_student=model_args.architecture == "deit_distill",
        drop_path_rate=model_args.drop_path_rate,
        attn_implementation=model_args.attn_implementation,
    )
    model = start.model
    if start.is_student:
        model = _student_with(model, model_args)
    processor = _checkpoint_processor(model, start, model_args)
    return BuiltModel(model, processor, start)


def _student_with(model: DeiTDistillForImageClassification, model_args: ModelArguments) -> nn.Module:
    """The converted student with the run's drop path, attention kernel and resolution."""
    config = model.config
    config.drop_path_rate = _or(model_args.drop_path_rate, STUDENT_DROP_PATH_RATE)
    # Drop path and the attention kernel are fixed at construction: build the student again around the weights.
    rebuilt = DeiTDistillForImageClassification._from_config(
        config, attn_implementation=model_args.attn_implementation or "sdpa"
    )
    rebuilt.load_state_dict(model.state_dict())
    if model_args.image_size and model_args.image_size != rebuilt.config.image_hw[0]:
        rebuilt.set_input_size(model_args.image_size)
    return rebuilt


def _checkpoint_processor(
    model: nn.Module, start: StartingPoint, model_args: ModelArguments
) -> BaseImageProcessor:
    """The checkpoint's own preprocessing, unless the run sets size, crop or normalisation (then a DeiT one)."""
    processor = start.image_processor
    explicit = any(
        value is not None
        for value in (model_args.image_size, model_args.crop_pct, model_args.image_mean, model_args.image_std)
    )
    if processor is not None and not explicit:
        return processor
    if model_args.image_size:
        image_size = model_args.image_size
    elif processor is not None:
        image_size = list(output_size(processor))
    elif getattr(model.config, "image_size", None):
        image_size = model.config.image_size
    else:
        raise UserError(
            f"--model_name_or_path {start.source} has no image processor and its config no image_size: set "
            "--image_size (and --image_mean/--image_std if it was not trained with ImageNet's)."
        )
    size_config = DeiTDistillConfig(image_size=image_size, patch_size=1, hidden_size=1, num_attention_heads=1)
    mean, std = (
        normalisation(processor) if processor is not None else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    )
    return build_image_processor(
        size_config,
        crop_pct=_or(model_args.crop_pct, getattr(processor, "crop_pct", None) or DEFAULT_CROP_PCT),
        image_mean=_normalisation(model_args.image_mean, "image_mean") or tuple(mean),
        image_std=_normalisation(model_args.image_std, "image_std") or tuple(std),
    )


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """`"a=1,b=[2,3],c=gelu"` -> `{"a": 1, "b": [2, 3], "c": "gelu"}` (values are JSON when they parse)."""
    if not text:
        return {}
    values = {}
    # Split only at commas that start a new `key=`, so list values keep their commas.
    for item in re.split(r",(?=\s*\w+\s*=)", text):
        key, _, raw = item.partition("=")
        if not raw:
            raise UserError(f"--config_overrides entries look like key=value, got {item!r}.")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            if "," in raw:
                raise UserError(
                    f"--config_overrides: cannot parse {item!r}; separate entries as key=value,key=value."
                ) from None
            values[key.strip()] = raw.strip()
    return values


def _normalisation(text: str | None, flag: str) -> tuple[float, ...] | None:
    """--image_mean / --image_std: three numbers, one per RGB channel (images are converted to RGB); a std > 0."""
    if text is None:
        return None
    try:
        values = tuple(float(value) for value in text.split(","))
    except ValueError:
        raise UserError(f"--{flag} takes comma-separated numbers, e.g. 0.5,0.5,0.5; got {text!r}.") from None
    if len(values) != 3:
        raise UserError(f"--{flag} takes 3 numbers, one per RGB channel (e.g. 0.5,0.5,0.5); got {text!r}.")
    if flag == "image_std" and not all(value > 0 for value in values):
        raise UserError(f"--{flag} values divide the pixels, so each must be > 0; got {text!r}.")
    return values


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
