"""`DistillationTrainer`: the Hugging Face Trainer with a frozen teacher and the DeiT loss.

The teacher is held by the trainer, not the model: it is placed on the device by hand (not through accelerate,
so no DDP wrapper, FSDP sharding or DeepSpeed engine under any launcher), runs under `no_grad` and an explicit
autocast in the run's precision, never reaches the optimizer and is never written into a checkpoint. It sees
exactly the (augmented, mixed) batch the student sees.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from deit_distill.modeling_deit_distill import attach_pipeline

from .device_augment import augment_batch
from .errors import UserError
from .evaluation import build_compute_metrics
from .losses import DistillationLoss
from .optim import layer_decay_param_groups, no_decay_parameter_names
from .output_files import use_default_modes
from .sampler import ViewSampler
from .teacher import (
    InputSpec,
    TeacherInputAdapter,
    load_teacher,
    load_teacher_image_processor,
    match_label_spaces,
    place_teacher,
    run_precision,
    teacher_autocast,
    teacher_logits_from_output,
)
from .teacher_cache import TeacherCache, run_epochs
from .views import AUGMENT_PARAMS, HOST_INPUTS, VIEW_KEYS, SeededViews, ViewCollator

logger = logging.getLogger(__name__)

# The loss settings a checkpoint (and the final model) was trained with: checked when a run resumes.
LOSS_SETTINGS_FILE = "distillation_loss.json"
# What a checkpoint folder holds besides `trainer_state.json`, by who wrote it (transformers' Trainer and
# accelerate's fsdp_utils, DeepSpeed's engine). A sharded torch.distributed.checkpoint folder is whole once its
# `.metadata` is written (the coordinator writes it after every rank's data); a DeepSpeed checkpoint once
# `latest` names its `global_stepN/` folder (written after the engine's barrier). Trainer writes
# trainer_state.json last, after all of these.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model_fsdp.bin",  # FSDP FULL_STATE_DICT
)
_DCP_MODEL_DIR = re.compile(r"^pytorch_model_fsdp_\d+$")  # FSDP SHARDED_STATE_DICT (DCP)
_RANK_MODEL_FILE = re.compile(r"^pytorch_model_fsdp(_\d+)?_rank\d+\.bin$")  # FSDP sharded/local, no DCP
_OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")  # plain; FSDP FULL_STATE_DICT
_DCP_OPTIMIZER_DIR = re.compile(r"^optimizer_\d+$")
_RANK_OPTIMIZER_FILE = re.compile(r"^optimizer_\d+_rank\d+\.bin$")
_SCHEDULER_FILE = "scheduler.pt"  # not written when DeepSpeed owns the scheduler


def loss_settings(loss: DistillationLoss) -> dict[str, Any]:
    """The settings that define `loss`: what a checkpoint records and a resume compares."""
    return {
        name: getattr(loss, name)
        for name in ("distillation_type", "alpha", "tau", "kl_reduction", "label_smoothing")
    }


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was written completely, or `None`.

    A run killed while writing a checkpoint leaves a partial folder; Trainer's own lookup would pick it and fail
    (or resume from a truncated state). Skipping it resumes from the previous, intact checkpoint instead. Every
    layout Trainer writes counts: plain (`optimizer.pt`), FSDP full (`optimizer.bin`) and sharded
    (`optimizer_0/`, `pytorch_model_fsdp_0/`) state dicts, DeepSpeed (`latest` + `global_stepN/`).
    """
    for _, folder in reversed(checkpoint_folders(output_dir)):
        if is_complete_checkpoint(folder):
            return folder
        logger.warning("Skipping incomplete checkpoint %s (interrupted while it was being written).", folder)
    return None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """`(step, folder)` of every `checkpoint-N` folder in `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return []
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    return sorted(
        (int(match.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (match := pattern.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )


def checkpoint_format(folder: str | os.PathLike) -> str | None:
    """Which layout a complete checkpoint folder has ("plain", "fsdp-full", "fsdp-sharded", "deepspeed"), or
    `None` when its training state is missing or partial."""
    folder = str(folder)
    names = set(os.listdir(folder))
    if not _valid_json(os.path.join(folder, "trainer_state.json")):
        return None
    if "latest" in names:
        return "deepspeed" if _complete_deepspeed(folder) else None
    weights = bool(names & set(_WEIGHT_FILES)) or any(
        _RANK_MODEL_FILE.match(name) or (_DCP_MODEL_DIR.match(name) and _complete_dcp(folder, name))
        for name in names
    )
    if not weights or _SCHEDULER_FILE not in names:
        return None
    if "optimizer.pt" in names:
        return "plain"
    if "optimizer.bin" in names:
        return "fsdp-full"
    dcp = [name for name in names if _DCP_OPTIMIZER_DIR.match(name)]
    if dcp:
        return "fsdp-sharded" if all(_complete_dcp(folder, name) for name in dcp) else None
    if any(_RANK_OPTIMIZER_FILE.match(name) for name in names):
        return "fsdp-sharded"
    return None


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    return checkpoint_format(folder) is not None


def _valid_json(path: str) -> bool:
    try:
        with open(path) as handle:
            json.load(handle)
    except (OSError, json.JSONDecodeError):
        return False
    return True


def _complete_dcp(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, name, ".metadata"))


def _complete_deepspeed(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "latest")) as handle:
            tag = handle.read().strip()
    except OSError:
        return False
    state = os.path.join(folder, tag)
    if not tag or not os.path.isdir(state):
        return False
    files = os.listdir(state)
    return any(name.endswith("model_states.pt") for name in files) and any(
        name.endswith("optim_states.pt") for name in files
    )


def rotate_checkpoints(
    output_dir: str | os.PathLike, limit: int | None, keep: tuple[str | None, ...] = ()
) -> None:
    """Keep the `limit` newest complete checkpoints (by step) and those in `keep`; delete older ones.

    Partial folders older than the newest complete checkpoint are leftovers of a killed save and go too; newer
    partial ones are left (training overwrites each when it reaches its step). The newest complete checkpoint is
    never deleted, whatever `limit` says.
    """
    if not limit or limit <= 0:
        return
    folders = checkpoint_folders(output_dir)
    complete = [folder for _, folder in folders if is_complete_checkpoint(folder)]
    if not complete:
        return
    newest_step = dict((folder, step) for step, folder in folders)[complete[-1]]
    kept = set(complete[-max(limit, 1) :]) | {os.path.normpath(path) for path in keep if path}
    for step, folder in folders:
        if step <= newest_step and folder not in kept and os.path.normpath(folder) not in kept:
            logger.info("Deleting checkpoint %s (save_total_limit=%d).", folder, limit)
            shutil.rmtree(folder, ignore_errors=True)


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` that trains a student against a frozen teacher with [`DistillationLoss`].

    Args:
        teacher: An `nn.Module`, or a Hub/local id loaded with `AutoModelForImageClassification` (including
            `timm/...` ids). Required unless `distillation_loss.distillation_type == "none"`.
        distillation_loss: The loss; defaults to `DistillationLoss()` (hard distillation when a teacher is
            given, plain cross-entropy otherwise).
        teacher_image_processor: The teacher's preprocessing, used to convert the student's batch (mean/std and
            resolution) on the device. Read from the teacher id when not given; `None` means "same as student".
        train_data_collator: Collator for training batches only (e.g. with Mixup/CutMix); evaluation uses
            `data_collator`, so metrics are computed on clean labels.
        repeated_augmentations: Copies of each image per epoch, each its own augmented view (DeiT uses 3).
        teacher_cache: A `TeacherCache` to train from instead of a teacher: the loss takes the teacher's stored
            outputs for each view, and no teacher runs (evaluation then reports no teacher metrics, and its
            loss is the labels' cross-entropy on both heads).
        layer_decay: Layer-wise lr decay for fine-tuning (e.g. 0.65): block `i` of `L` trains at
            `lr * layer_decay ** (L - i)`, the heads at `lr`; groups from the model's `group_matcher()` through
            timm's `param_groups_layer_decay` (see `deit_distill.training.optim`). `None` trains every layer at `lr`.
        allow_loss_change: Resume from a checkpoint saved with other loss settings (type, alpha, tau,
            kl_reduction, label smoothing; see `LOSS_SETTINGS_FILE`). Off by default: such a resume is refused.
        All other arguments are those of `transformers.Trainer`; `processing_class` should be the student's
        image processor so it is saved with every checkpoint.

    `predict` also takes unlabelled data (examples without `labels`): it then returns the logits and no loss or
    metrics.
    """

    # Whether training batches carry their view keys (`batch["view_keys"]`); on with a teacher cache, which is
    # read by them, and for whoever writes one.
    keep_view_keys = False

    def __init__(
        self,
        model: nn.Module | None = None,
        args=None,
        *,
        teacher: str | nn.Module | None = None,
        distillation_loss: DistillationLoss | None = None,
        teacher_image_processor: Any = None,
        train_data_collator: Callable | None = None,
        teacher_cache: TeacherCache | None = None,
        repeated_augmentations: int = 1,
        layer_decay: float | None = None,
        compute_metrics: Callable | None = None,
        allow_loss_change: bool = False,
        **kwargs: Any,
    ) -> None:
        if distillation_loss is None:
            distillation_loss = DistillationLoss("hard" if teacher is not None else "none")
        if teacher is not None and teacher_cache is not None:
            raise ValueError(
                "Pass a teacher or a teacher_cache, not both: the cache stands in for the teacher."
            )
        if distillation_loss.distillation_type != "none" and teacher is None and teacher_cache is None:
            raise ValueError(
                f"distillation_type={distillation_loss.distillation_type!r} needs a teacher; pass teacher=... "
                "(a model or a Hub/local id) or use distillation_type='none'."
            )
        if repeated_augmentations < 1:
            raise ValueError(f"repeated_augmentations must be >= 1, got {repeated_augmentations}.")
        self.distillation_loss = distillation_loss
        self.train_data_collator = train_data_collator
        self.teacher_cache = teacher_cache
        self.keep_view_keys = self.keep_view_keys or teacher_cache is not None
        # Evaluation runs no teacher when training reads a cache: its loss then uses the labels only.
        self.eval_loss = (
            distillation_loss
            if teacher_cache is None
            else DistillationLoss("none", label_smoothing=distillation_loss.label_smoothing)
        )
        self.repeated_augmentations = repeated_augmentations
        self.layer_decay = layer_decay
        self.allow_loss_change = allow_loss_change
        super().__init__(model=model, args=args, compute_metrics=compute_metrics, **kwargs)
        # Our loss is a per-batch mean: Trainer divides it by the accumulation steps itself, and needs no
        # token count (which would cost an all-gather per step under DDP).
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        # Running sums (and a count) of each loss term since the last log.
        self._loss_terms: dict[str, torch.Tensor] = {}
        self._loss_term_steps = 0

        self.teacher = None
        self.teacher_input_adapter = None
        self.teacher_label_index = None
        if teacher is not None:
            self._setup_teacher(teacher, teacher_image_processor)
        if self.compute_metrics is None:
            self.compute_metrics = build_compute_metrics(self.prediction_layout)

    def _setup_teacher(self, teacher: str | nn.Module, teacher_image_processor: Any) -> None:
        if teacher_image_processor is None:
            teacher_image_processor = load_teacher_image_processor(teacher)
        teacher = load_teacher(teacher)
        student_spec = self._student_input_spec()
        teacher_spec = (
            InputSpec.from_image_processor(teacher_image_processor)
            if teacher_image_processor
            else student_spec
        )
        if student_spec is not None and teacher_spec is not None:
            adapter = TeacherInputAdapter(student_spec, teacher_spec)
            if not adapter.is_identity:
                logger.info("Teacher input adapted on device: %s -> %s", student_spec, teacher_spec)
                self.teacher_input_adapter = adapter.to(self.args.device)

        # Fail before training, not at the first loss, when the class spaces differ.
        num_teacher_labels = self._probe_teacher_classes(teacher, teacher_spec or student_spec)
        index = match_label_spaces(self.model.config, getattr(teacher, "config", None), num_teacher_labels)
        self.teacher_label_index = None if index is None else index.to(self.args.device)
        # Placed by hand under every launcher (see `place_teacher`): never wrapped, sharded or saved.
        self.teacher = place_teacher(teacher, self.args.device)
        self.teacher_precision = run_precision(self.args)

    def _student_input_spec(self) -> InputSpec | None:
        if self.processing_class is None:
            return None
        return InputSpec.from_image_processor(self.processing_class)

    def _probe_teacher_classes(self, teacher: nn.Module, spec: InputSpec | None) -> int:
        num_labels = getattr(getattr(teacher, "config", None), "num_labels", None)
        if num_labels is not None:
            return num_labels
        if spec is None:
            raise ValueError(
                "Cannot tell how many classes the teacher predicts: give it a config with num_labels or pass "
                "processing_class (the student's image processor) so a probe batch can be built."
            )
        probe = torch.zeros(1, len(spec.mean), *spec.size)
        with torch.no_grad():
            device = next(teacher.parameters()).device
            return teacher_logits_from_output(teacher(probe.to(device))).shape[-1]

    @property
    def prediction_layout(self) -> tuple[str, ...]:
        """Names of the logits `prediction_step` returns, in order."""
        layout = ["cls"]
        if getattr(getattr(self.model, "config", None), "use_distillation_token", False):
            layout.append("dist")
        if self.teacher is not None:
            layout.append("teacher")
        return tuple(layout)

    def teacher_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Teacher logits for a student batch, in the student's class order."""
        with torch.no_grad(), teacher_autocast(self.args.device, self.teacher_precision):
            if self.teacher_input_adapter is not None:
                pixel_values = self.teacher_input_adapter(pixel_values)
            logits = teacher_logits_from_output(self.teacher(pixel_values))
        if self.teacher_label_index is not None:
            logits = logits.index_select(-1, self.teacher_label_index)
        return logits

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # The one place a batch crosses to the device: entries in `HOST_INPUTS` (view keys) stay on the host.
        host = {name: inputs.pop(name) for name in HOST_INPUTS if name in inputs}
        inputs = super()._prepare_inputs(inputs)
        augment_params = host.pop(AUGMENT_PARAMS, None)
        if augment_params is not None:
            # --augment_on device: uint8 crossed; the whole train transform and the mix run here, on the device.
            inputs["pixel_values"] = augment_batch(inputs["pixel_values"], augment_params)
        inputs.update(host)
        return inputs

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        labels = inputs.pop("labels")
        view_keys = inputs.pop(VIEW_KEYS, None)
        outputs = model(**inputs)
        if self.teacher is not None:
            teacher_logits = self.teacher_logits(inputs["pixel_values"])
        elif self.teacher_cache is not None and view_keys is not None:
            hard = self.distillation_loss.distillation_type == "hard"
            # Looked up on the host by the host-side keys; the result crosses to the device once.
            teacher_logits = self.teacher_cache.teacher_logits(view_keys, hard=hard)
            if self.args.device.type == "cuda":
                teacher_logits = teacher_logits.pin_memory()
            teacher_logits = teacher_logits.to(self.args.device, non_blocking=True)
        else:
            teacher_logits = None
        terms = self.distillation_loss(outputs, labels, teacher_logits)
        if model.training:
            self._accumulate_loss_terms(terms)
        return (terms.loss, outputs) if return_outputs else terms.loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels", None)  # None: unlabelled data (predict), no loss to compute
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
            teacher_logits = self.teacher_logits(inputs["pixel_values"]) if self.teacher is not None else None
            loss = None if labels is None else self.eval_loss(outputs, labels, teacher_logits).loss.detach()
        if prediction_loss_only:
            return loss, None, None
        cls_logits = getattr(outputs, "cls_logits", None)
        logits = [outputs.logits if cls_logits is None else cls_logits]
        if "dist" in self.prediction_layout:
            logits.append(outputs.distillation_logits)
        if teacher_logits is not None:
            logits.append(teacher_logits)
        return loss, tuple(t.float() for t in logits), labels

    def _accumulate_loss_terms(self, terms) -> None:
        values = {"base_loss": terms.base_loss}
        if self.teacher is not None or "dist" in self.prediction_layout:
            values["distillation_loss"] = terms.distillation_loss
        for name, value in values.items():
            value = value.detach().float()
            self._loss_terms[name] = self._loss_terms[name] + value if name in self._loss_terms else value
        self._loss_term_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs get the mean of each loss term since the last log, averaged over processes.
        if "loss" in logs and self._loss_term_steps:
            for name, total in self._loss_terms.items():
                mean = (total / self._loss_term_steps).reshape(1)
                logs[name] = round(self.accelerator.gather(mean).mean().item(), 6)
            self._loss_terms, self._loss_term_steps = {}, 0
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Everything but norms, biases and the model's `no_weight_decay()` (tokens, position embedding)."""
        no_decay = no_decay_parameter_names(model)
        return [name for name, _ in model.named_parameters() if name not in no_decay]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer; with `layer_decay`, on timm's layer-decay groups (same decay/no-decay split)."""
        if self.layer_decay is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        groups = layer_decay_param_groups(
            opt_model, optimizer_kwargs["lr"], self.args.weight_decay, self.layer_decay
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        # Training batches come from `SeededViews` and `ViewSampler`: every view (and every mixed batch) is a
        # function of its ViewKey, so the run does not depend on worker count, process count or a resume.
        dataset, collator = self.train_dataset, self.data_collator
        train_collator = self.train_data_collator or self.data_collator
        if self._draws_views(dataset):
            self.train_dataset = SeededViews(dataset)
            train_collator = ViewCollator(train_collator, keep_keys=self.keep_view_keys)
            self._check_view_layout(self.train_dataset)
        self.data_collator = train_collator
        try:
            loader = super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = dataset, collator
        if getattr(loader, "device", None) is not None:
            # accelerate's loader would send the whole batch to the device, host-only entries (view keys, augment
            # parameters) included; `_prepare_inputs` moves it instead, leaving those on the host.
            loader.device = None
        if self.teacher_cache is not None:
            self.teacher_cache.check_epochs(run_epochs(self.args, len(loader)))
            self.teacher_cache.check_pixels(self)  # the views replay as they were cached
        return loader

    def _check_view_layout(self, views: SeededViews) -> None:
        """Before the first step: a teacher cache (read or written) needs every batch within one global batch.

        With several processes and an epoch that does not split into whole global batches, accelerate pads each
        process's last batch with views from the start of the epoch; a cache stores each view once, where it was
        drawn, so the padded batch has no entry (found only at the end of the first epoch, or after a whole
        precompute pass).
        """
        if not self.keep_view_keys or self.args.world_size == 1 or self.args.dataloader_drop_last:
            return
        per_step = self._train_batch_size * self.args.world_size
        epoch = len(self._get_train_sampler(views))
        if epoch % per_step:
            raise UserError(
                f"teacher cache: an epoch of {epoch} views does not split into global batches of {per_step} "
                f"({self._train_batch_size} per process x {self.args.world_size} processes), and accelerate would "
                "pad the last one with views a cache does not hold. Pass --dataloader_drop_last true to "
                "cache-teacher and train alike, or a batch size that divides the epoch."
            )

    @staticmethod
    def _draws_views(dataset: Any) -> bool:
        return (
            dataset is not None
            and not isinstance(dataset, torch.utils.data.IterableDataset)
            and hasattr(dataset, "__len__")
        )

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not isinstance(dataset, SeededViews):
            return super()._get_train_sampler(train_dataset)
        return ViewSampler(
            dataset,
            global_batch_size=self._train_batch_size * self.args.world_size,
            num_repeats=self.repeated_augmentations,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            # A cache replayed in cycles: epoch e draws the views of cached epoch e % epochs.
            num_distinct_epochs=self.teacher_cache.epochs
            if self.teacher_cache is not None and self.teacher_cache.cycle
            else None,
        )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # The view key rides along with each example to the collator, which takes it out.
        if "view" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "view"]

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Trainer rotates by modification time and counts partial folders; ours keeps the newest complete
        # checkpoints by step (see `rotate_checkpoints`), so a rotation never removes the run's real progress.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            # Optimizer, scheduler and RNG files too, whichever library wrote them (see `use_default_modes`).
            use_default_modes(f"{run_dir}/{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}", recursive=True)
            rotate_checkpoints(run_dir, limit, keep=(self.state.best_model_checkpoint,))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                logger.warning("No complete checkpoint in %s; starting from scratch.", self.args.output_dir)
        if isinstance(resume_from_checkpoint, str):
            self._check_loss_settings(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _check_loss_settings(self, checkpoint: str) -> None:
        """Refuse to resume a checkpoint trained with other loss settings, unless `allow_loss_change`."""
        path = os.path.join(checkpoint, LOSS_SETTINGS_FILE)
        if not os.path.isfile(path):
            return  # a checkpoint from before the settings were saved: nothing to compare
        with open(path) as handle:
            saved = json.load(handle)
        current = loss_settings(self.distillation_loss)
        changed = [
            f"{key} {saved.get(key)!r} -> {value!r}"
            for key, value in current.items()
            if saved.get(key) != value
        ]
        if not changed:
            return
        if self.allow_loss_change:
            logger.warning("Resuming %s with other loss settings: %s.", checkpoint, ", ".join(changed))
            return
        raise UserError(
            f"--resume_from_checkpoint {checkpoint} was trained with other loss settings ({', '.join(changed)}); "
            "pass the checkpoint's settings, or --allow_loss_change true to resume with the new ones."
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Every saved model (final or checkpoint) carries the pipeline that decodes images as training does.
        if self.args.should_save and os.path.isfile(os.path.join(output_dir, "config.json")):
            attach_pipeline(output_dir)
        # The loss settings travel with every checkpoint, so a resume with other settings is noticed.
        if self.args.should_save:
            with open(os.path.join(output_dir, LOSS_SETTINGS_FILE), "w") as handle:
                json.dump(loss_settings(self.distillation_loss), handle, indent=2)
            use_default_modes(output_dir)  # safetensors leaves model.safetensors 0600
