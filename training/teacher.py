"""The teacher side of distillation: loading, class-space checks and input adaptation.

The teacher is usually a convnet trained elsewhere, with its own label order, normalisation and resolution. This
module reconciles each of those with the student before the first step, so a mismatch fails early and clearly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, PretrainedConfig

from .checkpoints import check_model_folder
from .errors import MissingPathError, UserError
from .transforms import normalisation, output_size

logger = logging.getLogger(__name__)

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


def load_teacher(teacher: str | nn.Module, **from_pretrained_kwargs) -> nn.Module:
    """A frozen teacher in eval mode, from a module or a Hub/local id (`timm/...` ids through transformers)."""
    if isinstance(teacher, str):
        if teacher.startswith((os.sep, ".")) and not os.path.isdir(teacher):
            raise MissingPathError(
                f"--teacher {teacher}: no such folder; train or download the teacher first."
            )
        check_model_folder(teacher, "--teacher")  # damaged files, or a text model, named before loading
        try:
            with whole_model_loading():
                teacher = AutoModelForImageClassification.from_pretrained(teacher, **from_pretrained_kwargs)
        except OSError as error:
            if os.path.isdir(teacher):
                raise
            # A relative path such as "runs/teacher" is also a well-formed Hub id, so it reaches the Hub.
            raise MissingPathError(
                f"--teacher {teacher}: neither a local folder nor a model loadable from the Hub "
                f"({str(error).splitlines()[0][:160]}). Train or download it first, or check the path or id."
            ) from error
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or a model id/path, got {type(teacher).__name__}.")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """Load a model whole, in every process, whatever the launcher.

    While a run's TrainingArguments exist, transformers' `from_pretrained` partitions a model over the processes
    under DeepSpeed ZeRO-3 (`deepspeed.zero.Init`) and, under FSDP with `fsdp_cpu_ram_efficient_loading`, loads
    real weights on local rank 0 only (the others wait for FSDP to broadcast them). A frozen teacher is never
    given to DeepSpeed or FSDP, so it would stay partitioned or empty: both are switched off while it loads.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved_ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    saved_env = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved_ref
        if saved_env is None:
            os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
        else:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved_env


def run_precision(training_args) -> str:
    """The precision a run computes in: "bf16", "fp16" or "fp32" (its teacher runs, and its cache records, it)."""
    return "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def place_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The frozen teacher on `device`, as is: not given to accelerate's `prepare`.

    `prepare_model(evaluation_mode=True)` does not place a model under FSDP (device placement is off there),
    would hand it to DeepSpeed's engine under ZeRO, and registers it with the accelerator, whose `save_state`
    would then write it into checkpoints. The teacher needs none of it: no gradients, no sharding, no saving.
    """
    teacher = teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast the teacher runs under: the run's precision, explicitly.

    accelerate applies its native autocast to the models it prepares, except under DeepSpeed (which casts the
    student itself); the teacher is not prepared, so it gets its own, the same under every launcher.
    """
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_teacher_image_processor(teacher: str | nn.Module):
    """The teacher's image processor when it has one (a Hub/local id), else `None` (assume the student's)."""
    name = (
        teacher
        if isinstance(teacher, str)
        else getattr(getattr(teacher, "config", None), "_name_or_path", "")
    )
    if not name:
        return None
    try:
        return AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        logger.warning("No image processor found for teacher %r; assuming the student's preprocessing.", name)
        return None


def teacher_logits_from_output(output) -> torch.Tensor:
    """Logits from a teacher's output: a tensor, a ModelOutput with `.logits`, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot read logits from a teacher output of type {type(output).__name__}.")


def _label_names(config: PretrainedConfig | None) -> list[str] | None:
    id2label = getattr(config, "id2label", None)
    if not id2label:
        return None
    names = [str(id2label[i]) for i in sorted(int(k) for k in id2label)]
    # transformers fills LABEL_i when no names were given; such names carry no order information.
    return None if all(_GENERIC_LABEL.match(name) for name in names) else names


def _describe(names: list[str] | None, count: int) -> str:
    if names is None:
        return f"{count} unnamed classes"
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f"{count} classes [{shown}]"


def match_label_spaces(
    student_config: PretrainedConfig, teacher_config: PretrainedConfig | None, teacher_num_labels: int
) -> torch.Tensor | None:
    """Index that reorders teacher logits into the student's class order, or `None` when no reorder is needed.

    Raises a `ValueError` naming both label sets when the class spaces differ.
    """
    student_names = _label_names(student_config)
    teacher_names = _label_names(teacher_config)
    student_count = student_config.num_labels
    mismatch = (
        f"The teacher predicts {_describe(teacher_names, teacher_num_labels)} but the student has "
        f"{_describe(student_names, student_count)}. Distillation needs the same class space: fine-tune the "
        "teacher on this dataset first: `deit-distill train --model_name_or_path YOUR_TEACHER --distillation_type "
        "none --dataset_name ... --output_dir runs/teacher` (any transformers or timm classifier keeps its "
        "architecture and gets new heads), then pass --teacher runs/teacher."
    )
    if teacher_num_labels != student_count:
        raise UserError(mismatch)
    if student_names is None or teacher_names is None or student_names == teacher_names:
        return None
    if sorted(student_names) != sorted(teacher_names) or len(set(teacher_names)) != len(teacher_names):
        raise UserError(mismatch)
    teacher_index = {name: i for i, name in enumerate(teacher_names)}
    logger.info("Teacher labels are in another order; teacher logits are remapped to the student's order.")
    return torch.tensor([teacher_index[name] for name in student_names], dtype=torch.long)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects of its pixels: per-channel normalisation and spatial size."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]

    @classmethod
    def from_image_processor(cls, processor) -> InputSpec:
        """Read mean/std and the final (cropped) size from a transformers or timm-wrapper image processor."""
        mean, std = normalisation(processor)
        return cls(mean, std, output_size(processor))


class TeacherInputAdapter(nn.Module):
    """Turns a student batch into the teacher's input on the device: unnormalise, renormalise, resize.

    It is the identity when both sides agree, so the common case costs nothing.
    """

    def __init__(self, student: InputSpec, teacher: InputSpec) -> None:
        super().__init__()
        if len(student.mean) != len(teacher.mean):
            raise ValueError(
                f"Student images have {len(student.mean)} channels but the teacher expects {len(teacher.mean)}."
            )
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t = x_student * scale + shift
        mean_s, std_s = torch.tensor(student.mean), torch.tensor(student.std)
        mean_t, std_t = torch.tensor(teacher.mean), torch.tensor(teacher.std)
        self.register_buffer("scale", (std_s / std_t).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_s - mean_t) / std_t).view(1, -1, 1, 1), persistent=False)
        self.renormalize = not (torch.allclose(mean_s, mean_t) and torch.allclose(std_s, std_t))
        self.size = None if teacher.size == student.size else teacher.size

    @property
    def is_identity(self) -> bool:
        return not self.renormalize and self.size is None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.renormalize:
            pixel_values = pixel_values * self.scale.to(pixel_values.dtype) + self.shift.to(
                pixel_values.dtype
            )
        if self.size is not None:
            pixel_values = F.interpolate(
                pixel_values, size=self.size, mode="bicubic", align_corners=False, antialias=True
            )
        return pixel_values
