"""Starting points: any checkpoint becomes a model to train, through one loading path.

- DeiT/ViT checkpoints become this project's student: ours; transformers' `DeiTForImageClassificationWithTeacher`,
  `DeiTForImageClassification`, `ViTForImageClassification`; timm `deit_*`/`vit_*` as a `timm/...` id, a Hugging
  Face-layout folder (`config.json` with `architecture`, as `timm/...` repos are) or an official state-dict file.
  They are converted on the fly (bit-exact, `deit_distill.modeling_deit_distill.convert_deit_distill`).
- Any other image classifier is fine-tuned as it is, e.g. a teacher: a transformers
  `AutoModelForImageClassification` (ResNet, ConvNeXt, RegNet, EfficientNet, Swin, ...) or a timm model (through
  transformers' `TimmWrapperForImageClassification`, so it saves and loads like any transformers model).

Each comes with its own preprocessing (its image processor, or timm's `pretrained_cfg`), which training uses and
saves, so that `--teacher RUN_DIR` later adapts the student's inputs to it. Nothing here downloads unless the
source is a Hub id.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ConvNextImageProcessor,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    PretrainedConfig,
    ViTForImageClassification,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import PILImageResampling

from deit_distill.modeling_deit_distill import DeiTDistillConfig, DeiTDistillForImageClassification
from deit_distill.modeling_deit_distill.convert_deit_distill import from_timm, from_transformers_deit

from .errors import MissingPathError, UserError, with_reason

logger = logging.getLogger(__name__)

TRANSFORMERS_STUDENT_CLASSES = {
    cls.__name__: cls
    for cls in (DeiTForImageClassificationWithTeacher, DeiTForImageClassification, ViTForImageClassification)
}
_TIMM_STUDENT_PREFIXES = ("deit_", "vit_")
_STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# ViT/DeiT heads are 64 wide in every published size (Ti 192/3, S 384/6, B 768/12, L 1024/16).
_VIT_HEAD_DIM = 64


@dataclass
class StartingPoint:
    """A loaded checkpoint, ready to be trained.

    Attributes:
        model: The model; a `DeiTDistillForImageClassification` for DeiT/ViT sources.
        image_processor: The checkpoint's preprocessing, or `None` when it has none.
        source: What was loaded (a path or a Hub id).
        kind: "deit_distill" (ours), "transformers" or "timm" (converted students), or "as_is" (fine-tuned in
            its own architecture).
        hub_id: The Hub id when the source is one (for the model card's `base_model`).
    """

    model: nn.Module
    image_processor: BaseImageProcessor | None
    source: str
    kind: str
    hub_id: str | None

    @property
    def is_student(self) -> bool:
        """Whether the model is this project's DeiT (a converted or native student)."""
        return isinstance(self.model, DeiTDistillForImageClassification)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors or torch file; unwraps the `{"model": ...}` of official DeiT checkpoints.

    Raises:
        UserError: the file is empty, truncated or not a weights file (the message names it).
    """
    path = Path(path)
    check_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, pickle and zip report damage in their own types
        raise UserError(
            f"{path}: cannot read the weights ({_first_line(error)}); the file is damaged."
        ) from error
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict of weights.")
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def student_from_timm_state_dict(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None, **overrides: Any
) -> DeiTDistillForImageClassification:
    """An official timm/DeiT state dict as our student; the head count defaults to width / 64, as in DeiT/ViT."""
    if num_attention_heads is None and "cls_token" in state_dict:
        num_attention_heads = state_dict["cls_token"].shape[-1] // _VIT_HEAD_DIM
        logger.info(
            "Assuming %d attention heads (64 per head, as in every DeiT/ViT size).", num_attention_heads
        )
    return from_timm(state_dict, num_attention_heads=num_attention_heads, **overrides)


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TEXT_MAPPINGS = (
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES",
)
_AUDIO_MAPPINGS = ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_CTC_MAPPING_NAMES")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def read_json_file(path: str | os.PathLike, what: str = "") -> dict[str, Any]:
    """A JSON object from `path`, or a `UserError` naming the file and what is wrong with it."""
    path = Path(path)
    prefix = f"{what}: " if what else ""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{prefix}{path} is not a text (JSON) file; the file is damaged.") from None
    if not text.strip():
        raise UserError(f"{prefix}{path} is empty; the file is damaged (copy or save it again).")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            with_reason(
                f"{prefix}{path} is not valid JSON (",
                error.msg,
                f" at line {error.lineno}); the file is damaged.",
            )
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{prefix}{path} holds a JSON {type(value).__name__}, not an object.")
    return value


def check_weights_file(path: Path) -> None:
    """Refuse an empty or truncated weights file before a loader fails on it without naming it.

    A .safetensors file states its own length (an 8-byte header size, the header, then the tensors up to the
    largest end offset); a .bin/.pth in torch's zip format has its directory at the end, so truncation loses it.
    """
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty: no weights (copy or save the model again).")
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if not 2 <= header_size <= size - 8:
                raise UserError(
                    f"{path} is not a safetensors file (or it is truncated): its header is unreadable."
                )
            try:
                header = json.loads(handle.read(header_size))
            except ValueError:
                raise UserError(f"{path} is not a safetensors file: its header is not JSON.") from None
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        expected = 8 + header_size + max(ends, default=0)
        if size < expected:
            raise UserError(
                f"{path} is truncated: {size} bytes of the {expected} its header describes (copy or save it again)."
            )
    elif path.suffix in (".bin", ".pth", ".pt"):
        import zipfile

        with open(path, "rb") as handle:
            zip_magic = handle.read(4) == b"PK\x03\x04"
        if zip_magic and not zipfile.is_zipfile(path):
            raise UserError(f"{path} is truncated: its zip directory is missing (copy or save it again).")


def check_model_folder(source: str, what: str, *, state_dict_file: bool = False) -> None:
    """A saved model folder that every loader can read: its config.json is JSON of an image classifier, its weights
    are whole and its preprocessor_config.json (if any) is JSON. Each problem is one `UserError` naming the file.

    A Hub id is left to its loader, and so is a file where `state_dict_file` allows one (--model_name_or_path);
    any other file is refused.
    """
    folder = Path(source)
    if folder.is_file() and not state_dict_file:
        raise UserError(
            f"{what} {source} is a file; give a model folder (a training run, save_pretrained or a downloaded Hub "
            "model) or a Hub id."
        )
    if not folder.is_dir():
        check_model_source(source, what)
        _check_offline_hub_id(source, what)
        return
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingPathError(
            f"{what} {source}: the folder has no config.json; give a saved model folder (a training run, "
            "save_pretrained or a downloaded Hub model), a Hub id or a state-dict file (.pth, .safetensors)."
        )
    config = read_json_file(config_path, what)
    if "architecture" not in config:  # timm's Hub layout has no model_type, and is an image classifier
        check_image_classifier(config.get("model_type"), f"{what} {source}")
    processor_path = folder / "preprocessor_config.json"
    if processor_path.is_file():
        read_json_file(processor_path, what)
    weights = [folder / name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        onnx = (
            " It holds model.onnx: an `export` folder runs with `predict --onnx`."
            if any(folder.glob("*.onnx"))
            else ""
        )
        raise MissingPathError(
            f"{what} {source}: the folder has no weights ({' or '.join(_WEIGHT_FILES[::2])}); save or copy the "
            f"whole model.{onnx}"
        )
    shards = [weights[0]]
    if weights[0].name.endswith(".index.json"):
        index = read_json_file(weights[0], what)
        shards = [folder / name for name in sorted(set((index.get("weight_map") or {}).values()))]
        for shard in shards:
            if not shard.is_file():
                raise MissingPathError(
                    f"{what} {source}: the shard {shard.name} named in {weights[0].name} is missing."
                )
    for shard in shards:
        try:
            check_weights_file(shard)
        except UserError as error:  # the file is named; the flag it came from too
            raise UserError(f"{what}: {error}") from error


def check_image_classifier(model_type: str | None, where: str) -> None:
    """Name a model of the wrong kind: "is a bert text model, not an image classifier"."""
    from transformers.models.auto import modeling_auto

    if model_type in (
        DeiTDistillConfig.model_type,
        *modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    ):
        return
    if not model_type:
        raise UserError(f"{where}: config.json has no model_type, so the kind of model is unknown.")

    def among(names: tuple[str, ...]) -> bool:
        return any(model_type in getattr(modeling_auto, name, {}) for name in names)

    if among(_TEXT_MAPPINGS) or among(_AUDIO_MAPPINGS):
        kind = f"{model_type} {'text' if among(_TEXT_MAPPINGS) else 'audio'} model"
    else:
        kind = f"{model_type} model without an image-classification head"
    raise UserError(f"{where} is a {kind}, not an image classifier.")


def _is_hub_id(source: str) -> bool:
    return not os.path.exists(source) and source.count("/") == 1 and not source.startswith((".", "/", "~"))


def check_model_source(source: str, what: str) -> None:
    """Fail early, naming `what` (a flag or command), when `source` is neither an existing path nor a Hub id."""
    if not os.path.exists(source) and not _is_hub_id(source):
        raise MissingPathError(
            f"{what}: {source}: no such run, model folder or file (and not a Hub id owner/name)."
        )


def _check_offline_hub_id(source: str, what: str) -> None:
    """Offline (HF_HUB_OFFLINE=1), a Hub id can only be read from the local cache: one that is not there is said
    now, before the data loads, rather than by the loader later."""
    from huggingface_hub import constants, try_to_load_from_cache

    if os.path.exists(source) or not constants.HF_HUB_OFFLINE:
        return
    if not isinstance(try_to_load_from_cache(source, "config.json"), str):
        raise MissingPathError(
            f"{what} {source}: no such folder here, and as a Hub id it is not in the local Hub cache (the Hub is "
            "off: HF_HUB_OFFLINE=1). Check the path, or download the model while online."
        )


def _raw_config(source: str) -> dict[str, Any]:
    """`config.json` of a folder or Hub repo as a dict (timm's configs are not transformers configs)."""
    if os.path.isdir(source):
        check_model_folder(source, "--model_name_or_path")
        return read_json_file(Path(source) / "config.json", "--model_name_or_path")
    if not _is_hub_id(source):
        raise MissingPathError(
            f"--model_name_or_path {source}: no such file or folder (and not a Hub id of the form owner/name)."
        )
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source, "config.json")
    except Exception as error:  # offline, missing repo, no config: all the user can fix is the id
        raise UserError(
            f"--model_name_or_path {source}: cannot read its config.json from the Hub "
            f"({type(error).__name__}). Check the id, or download the model to a folder first."
        ) from error
    return read_json_file(path, "--model_name_or_path")


def _image_processor(source: str) -> BaseImageProcessor | None:
    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None


def processor_from_timm(processor: BaseImageProcessor | None) -> BaseImageProcessor | None:
    """timm's eval preprocessing as a savable transformers processor, for a student converted from timm.

    `TimmWrapperImageProcessor` is saved inside a timm model's config.json, which our student does not have.
    ConvNeXt's processor does what timm's centre-crop eval does: shortest edge to size / crop_pct, centre crop.
    """
    data_config = getattr(processor, "data_config", None)
    if data_config is None:
        return processor
    height, width = data_config["input_size"][-2:]
    if height != width:
        raise UserError(f"timm preprocessing with a non-square input {height}x{width} is not supported.")
    resample = {"bilinear": PILImageResampling.BILINEAR, "nearest": PILImageResampling.NEAREST}.get(
        data_config.get("interpolation"), PILImageResampling.BICUBIC
    )
    return ConvNextImageProcessor(
        size={"shortest_edge": height},
        crop_pct=data_config.get("crop_pct", 0.875),
        resample=resample,
        image_mean=list(data_config["mean"]),
        image_std=list(data_config["std"]),
    )


def load_starting_point(
    source: str,
    id2label: dict[int, str],
    *,
    require_student: bool = False,
    drop_path_rate: float | None = None,
    attn_implementation: str | None = None,
) -> StartingPoint:
    """Load `source` (a folder, a Hub id or a state-dict file) as a student or as a model to fine-tune as is,
    with classification heads for `id2label` (new heads when the checkpoint's labels differ, as logged).

    `drop_path_rate` and `attn_implementation` apply to models fine-tuned as they are, when set; students get
    theirs from `deit_distill.training.models`.

    Raises:
        MissingPathError / UserError: the source does not exist, cannot be read, or (`require_student`) is not
            a DeiT/ViT.
    """
    hub_id = source if _is_hub_id(source) else None
    if os.path.isfile(source):
        if not source.endswith(_STATE_DICT_SUFFIXES):
            raise UserError(
                f"--model_name_or_path {source}: a file must be a state dict ({', '.join(_STATE_DICT_SUFFIXES)})."
            )
        state_dict = load_state_dict_file(source)
        if "cls_token" not in state_dict or "pos_embed" not in state_dict:
            raise UserError(
                f"--model_name_or_path {source}: not a timm/DeiT ViT state dict (no cls_token/pos_embed among its "
                f"{len(state_dict)} tensors); a state-dict file must hold a DeiT or ViT."
            )
        model = student_from_timm_state_dict(state_dict)
        logger.info("Converted the timm/DeiT state dict %s to a DeiTDistill student.", source)
        relabel_student(model, id2label)
        return StartingPoint(model, None, source, "timm", None)

    config = _raw_config(source)
    processor = _image_processor(source)
    model_type = config.get("model_type")
    if model_type == DeiTDistillConfig.model_type:
        model = DeiTDistillForImageClassification.from_pretrained(source)
        relabel_student(model, id2label)
        return StartingPoint(model, processor, source, "deit_distill", hub_id)
    if model_type in ("deit", "vit"):
        architectures = config.get("architectures") or []
        # AutoModelForImageClassification would load a WithTeacher checkpoint without its distillation head.
        cls = next(
            (TRANSFORMERS_STUDENT_CLASSES[a] for a in architectures if a in TRANSFORMERS_STUDENT_CLASSES),
            None,
        )
        if cls is None:
            raise UserError(
                f"--model_name_or_path {source}: a {model_type} checkpoint without a classification head "
                f"({architectures}); give a *ForImageClassification checkpoint."
            )
        model = from_transformers_deit(cls.from_pretrained(source))
        logger.info("Converted transformers %s from %s to a DeiTDistill student.", cls.__name__, source)
        relabel_student(model, id2label)
        return StartingPoint(model, processor, source, "transformers", hub_id)

    timm_architecture = config.get("architecture")
    if require_student and not str(timm_architecture or "").startswith(_TIMM_STUDENT_PREFIXES):
        found = timm_architecture or model_type or "unknown"
        raise UserError(
            f"--architecture deit_distill needs a DeiT/ViT checkpoint, but {source} is a {found} model. To "
            "fine-tune it as it is (e.g. as a teacher), leave --architecture unset."
        )
    if str(timm_architecture or "").startswith(_TIMM_STUDENT_PREFIXES):
        wrapper = AutoModelForImageClassification.from_pretrained(source, config=_model_config(source))
        student = from_timm(wrapper.timm_model, id2label=dict(wrapper.config.id2label))
        logger.info("Converted timm %s from %s to a DeiTDistill student.", timm_architecture, source)
        relabel_student(student, id2label)
        return StartingPoint(student, processor_from_timm(processor), source, "timm", hub_id)
    # Only what the user set, and only what the model has: a ResNet has no drop path, a Swin no sdpa.
    model_config = _model_config(
        source,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
    )
    if drop_path_rate is not None:
        if not hasattr(model_config, "drop_path_rate"):
            raise UserError(
                f"--drop_path_rate: {source} ({model_type or timm_architecture}) has no stochastic depth setting; "
                "leave it unset."
            )
        model_config.drop_path_rate = drop_path_rate
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # transformers replaces a head whose size differs from the new label set, for any architecture.
    model = AutoModelForImageClassification.from_pretrained(
        source, config=model_config, ignore_mismatched_sizes=True, **options
    )
    original = config.get("id2label") or {}
    original_names = [original.get(str(i), original.get(i)) for i in range(len(original))]
    if len(original_names) == len(id2label):
        _match_head_to_labels(model, original_names, [id2label[i] for i in range(len(id2label))])
    logger.info("Fine-tuning %s (%s) as it is, for %d classes.", source, type(model).__name__, len(id2label))
    return StartingPoint(model, processor, source, "as_is", hub_id)


def _match_head_to_labels(model: nn.Module, original: list[str], names: list[str]) -> None:
    """A head of the right size can still be for other classes: reorder its rows, or start it afresh.

    transformers keeps a same-sized head whatever the new `id2label` says, so a checkpoint whose 10 classes are
    not the dataset's 10 would predict the old classes under the new names.
    """
    if original == names:
        return
    head = next(
        (
            m
            for m in reversed(list(model.modules()))
            if isinstance(m, nn.Linear) and m.out_features == len(names)
        ),
        None,
    )
    if head is None:
        raise UserError(
            f"Cannot find the classification layer of {type(model).__name__} to fit it to the dataset's classes."
        )
    with torch.no_grad():
        if sorted(original) == sorted(names) and len(set(names)) == len(names):
            order = torch.tensor([original.index(name) for name in names])
            head.weight.copy_(head.weight[order])
            if head.bias is not None:
                head.bias.copy_(head.bias[order])
            logger.info("The checkpoint's classes are the dataset's in another order: head rows reordered.")
            return
        head.reset_parameters()
    logger.info("The checkpoint's %d classes are not the dataset's: new classification head.", len(names))


def _model_config(source: str, **overrides: Any) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(source, **overrides)
    # timm's `save_for_hf` may record num_classes among the creation arguments, which transformers' wrapper also
    # passes: the label count must come from the config alone.
    if isinstance(getattr(config, "model_args", None), dict):
        config.model_args.pop("num_classes", None)
    return config


def relabel_student(model: DeiTDistillForImageClassification, id2label: dict[int, str]) -> bool:
    """Give a student the dataset's labels: new heads when they differ. Returns whether the heads were replaced."""
    current = [model.config.id2label.get(i) for i in range(model.config.num_labels)]
    names = [id2label[i] for i in range(len(id2label))]
    if current == names:
        return False
    model.reset_classifier(len(names))
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: index for index, name in enumerate(names)}
    logger.info(
        "New classification heads for the dataset's %d classes (the checkpoint had %d).",
        len(names),
        len(current),
    )
    return True
