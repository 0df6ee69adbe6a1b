"""DistillationTrainer: the teacher's place in training, the loss, metrics and Trainer features, each checked
against a reference computed here from the models' own logits, parameters and files.

Everything runs on CPU with a one-block DeiT student and a two-stage ResNet teacher on random 16x16 images.
"""

from __future__ import annotations

import copy
import glob
import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from transformers import (
    DeiTImageProcessor,
    ResNetConfig,
    ResNetForImageClassification,
    TrainingArguments,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    build_image_processor,
)
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.trainer import DistillationTrainer
from deit_distill.training.views import VIEW_KEYS

LABELS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "owl", "yak"]
SIZE = 16
assert_close = partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6, check_dtype=False)


def label_kwargs(labels: list[str]) -> dict:
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def make_student(seed: int = 0) -> DeiTDistillForImageClassification:
    torch.manual_seed(seed)
    config = DeiTDistillConfig(
        image_size=SIZE,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        drop_path_rate=0.0,
        **label_kwargs(LABELS),
    )
    return DeiTDistillForImageClassification(config)


def make_teacher(labels: list[str] = LABELS, seed: int = 1) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **label_kwargs(labels)
    )
    return ResNetForImageClassification(config)


class ImageTensors(torch.utils.data.Dataset):
    """Already-normalised random images with random labels, as the transforms would produce them."""

    def __init__(self, n: int, seed: int, size: int = SIZE) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, len(LABELS), (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": int(self.labels[index])}


class RecordingCollator(DistillationCollator):
    """A DistillationCollator that keeps every batch it makes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, examples, **kwargs):
        batch = super().__call__(examples, **kwargs)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def training_args(output_dir, **overrides) -> TrainingArguments:
    values = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "seed": 0,
    }
    return TrainingArguments(**{**values, **overrides})


def record_inputs(module: torch.nn.Module, sink: list[torch.Tensor]) -> None:
    """Append the `pixel_values` every forward call of `module` receives (positional or keyword)."""

    def hook(_module, args, kwargs):
        sink.append((args[0] if args else kwargs["pixel_values"]).detach().clone())

    module.register_forward_pre_hook(hook, with_kwargs=True)


def safetensors_keys(folder: Path) -> set[str]:
    keys = set()
    for path in glob.glob(str(folder / "*.safetensors")):
        with safe_open(path, "pt") as handle:
            keys |= set(handle.keys())
    return keys


def log_softmax64(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))


def cross_entropy64(z: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    q = F.one_hot(y, z.shape[-1]).double() * (1 - smoothing) + smoothing / z.shape[-1]
    return -(q * log_softmax64(z)).sum(dim=-1).mean()


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).double().mean().item()


# ------------------------------------------------------------------------------------------------------------------
# The teacher during training: one short hard-distillation run with Mixup/CutMix, shared by the tests below.


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("hard_run")
    student, teacher = make_student(), make_teacher()
    run = SimpleNamespace(
        output_dir=output_dir,
        student=student,
        teacher=teacher,
        student_before=copy.deepcopy(student.state_dict()),
        teacher_before=copy.deepcopy(teacher.state_dict()),
        student_inputs=[],
        teacher_inputs=[],
        collator=RecordingCollator(num_classes=len(LABELS), mixup_alpha=0.8, cutmix_alpha=1.0),
    )
    record_inputs(student, run.student_inputs)
    record_inputs(teacher, run.teacher_inputs)
    run.trainer = DistillationTrainer(
        model=student,
        args=training_args(output_dir, save_strategy="steps", save_steps=2, max_steps=2),
        teacher=teacher,
        distillation_loss=DistillationLoss("hard", alpha=0.5),
        train_data_collator=run.collator,
        data_collator=DistillationCollator(),
        train_dataset=ImageTensors(32, seed=0),
    )
    run.trainer.train()
    run.trainer.save_model()
    return run


def test_teacher_stays_frozen_in_eval_mode_and_unchanged_while_the_student_trains(hard_run):
    teacher = hard_run.trainer.teacher
    assert not teacher.training
    assert not any(module.training for module in teacher.modules())
    assert not any(param.requires_grad for param in teacher.parameters())
    # Eval mode also means BatchNorm running statistics were not updated by the training batches.
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, hard_run.teacher_before[name], rtol=0, atol=0, msg=name)
    changed = [
        n for n, v in hard_run.student.state_dict().items() if not torch.equal(v, hard_run.student_before[n])
    ]
    assert changed, "the student did not train, so the checks above prove nothing"


def test_teacher_is_not_wrapped_and_not_in_the_optimizer(hard_run):
    trainer = hard_run.trainer
    assert trainer.teacher is hard_run.teacher
    assert type(trainer.teacher) is ResNetForImageClassification
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in hard_run.teacher.parameters())
    assert optimized == {id(p) for p in hard_run.student.parameters()}


def test_checkpoints_and_the_final_model_hold_the_student_only(hard_run):
    student_keys = set(hard_run.student.state_dict())
    teacher_keys = set(hard_run.teacher.state_dict())
    assert student_keys.isdisjoint(teacher_keys)
    for folder in (hard_run.output_dir / "checkpoint-2", hard_run.output_dir):
        assert safetensors_keys(folder) == student_keys, folder
        assert not glob.glob(str(folder / "pytorch_model*.bin")), folder
    # The optimizer state covers the student's parameters and nothing else.
    optimizer_state = torch.load(hard_run.output_dir / "checkpoint-2" / "optimizer.pt", weights_only=True)
    num_saved = sum(len(group["params"]) for group in optimizer_state["param_groups"])
    assert num_saved == len(list(hard_run.student.parameters()))


def test_teacher_sees_exactly_the_mixed_batch_the_student_sees(hard_run):
    # The data loader may collate one batch ahead (accelerate peeks to detect the last batch).
    batches = hard_run.collator.batches[:2]
    assert len(batches) == len(hard_run.student_inputs) == len(hard_run.teacher_inputs) == 2
    for batch, student_input, teacher_input in zip(
        batches, hard_run.student_inputs, hard_run.teacher_inputs, strict=True
    ):
        # Mixup/CutMix was applied: soft (B, C) targets.
        assert batch["labels"].is_floating_point() and batch["labels"].shape == (8, len(LABELS))
        assert torch.equal(student_input, batch["pixel_values"])
        assert torch.equal(teacher_input, student_input)


def test_base_and_distillation_terms_are_logged_and_make_up_the_loss(hard_run):
    logs = [entry for entry in hard_run.trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry in logs:
        assert entry["base_loss"] > 0 and entry["distillation_loss"] > 0
        # alpha = 0.5: loss = 0.5 * base + 0.5 * distillation.
        assert entry["loss"] == pytest.approx(
            0.5 * entry["base_loss"] + 0.5 * entry["distillation_loss"], abs=1e-4
        )


# ------------------------------------------------------------------------------------------------------------------
# The loss as Trainer calls it.


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_compute_loss_with_trainer_signature_matches_hand_computed_loss(tmp_path, kind):
    student, teacher = make_student(), make_teacher()
    alpha, tau, smoothing = 0.3, 2.0, 0.1
    trainer = DistillationTrainer(
        model=student,
        args=training_args(tmp_path),
        teacher=teacher,
        distillation_loss=DistillationLoss(kind, alpha=alpha, tau=tau, label_smoothing=smoothing),
    )
    dataset = ImageTensors(8, seed=5)
    batch = DistillationCollator()([dataset[i] for i in range(8)])

    loss = trainer.compute_loss(
        student, dict(batch), return_outputs=False, num_items_in_batch=torch.tensor(8)
    )

    with torch.no_grad():
        out = student(pixel_values=batch["pixel_values"])
        z_teacher = teacher(batch["pixel_values"]).logits
    base = cross_entropy64(out.cls_logits, batch["labels"], smoothing)
    if kind == "hard":
        distill = cross_entropy64(out.distillation_logits, z_teacher.argmax(-1))
    else:
        logp_s, logp_t = log_softmax64(out.distillation_logits / tau), log_softmax64(z_teacher / tau)
        # Official DeiT normalisation: sum over batch and classes divided by batch * classes.
        distill = tau**2 * (logp_t.exp() * (logp_t - logp_s)).sum() / z_teacher.numel()
    assert loss.requires_grad
    assert_close(loss, (1 - alpha) * base + alpha * distill)


# ------------------------------------------------------------------------------------------------------------------
# The teacher's own preprocessing.


def test_teacher_receives_the_batch_renormalised_and_resized_to_its_own_processor(tmp_path):
    student = make_student()
    student_processor = build_image_processor(
        student.config, crop_pct=1.0, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)
    )
    teacher_size = 24
    teacher_processor = DeiTImageProcessor(
        size={"height": teacher_size, "width": teacher_size},
        crop_size={"height": teacher_size, "width": teacher_size},
        do_center_crop=True,
        resample=PILImageResampling.BICUBIC,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )
    teacher_dir = tmp_path / "teacher"
    make_teacher().save_pretrained(teacher_dir)
    teacher_processor.save_pretrained(teacher_dir)
    # Given as a path, the trainer reads the teacher's processor from it.
    trainer = DistillationTrainer(
        model=student,
        args=training_args(tmp_path / "out"),
        teacher=str(teacher_dir),
        distillation_loss=DistillationLoss("hard"),
        processing_class=student_processor,
    )
    teacher_inputs: list[torch.Tensor] = []
    record_inputs(trainer.teacher, teacher_inputs)

    raw = np.random.default_rng(0).integers(0, 256, size=(4, SIZE, SIZE, 3), dtype=np.uint8)
    images = [Image.fromarray(array) for array in raw]
    pixel_values = student_processor(images=images, return_tensors="pt")["pixel_values"]
    labels = torch.tensor([0, 1, 2, 3])
    trainer.compute_loss(student, {"pixel_values": pixel_values, "labels": labels}, num_items_in_batch=4)

    # Reference, from the raw image: rescale to [0, 1], resize to the teacher's resolution (bicubic), then
    # normalise with the teacher's mean and std. (Resizing and normalising commute: bicubic weights sum to 1.)
    rescaled = torch.from_numpy(raw).permute(0, 3, 1, 2).double() / 255
    resized = F.interpolate(rescaled, size=(teacher_size, teacher_size), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (resized - mean) / std

    assert len(teacher_inputs) == 1
    assert teacher_inputs[0].shape == (4, 3, teacher_size, teacher_size)
    torch.testing.assert_close(teacher_inputs[0].double(), expected, rtol=0, atol=1e-4)
    # Up to the resampling kernel (PIL's vs torch's bicubic), that is what the teacher's own processor makes.
    own = teacher_processor(images=images, return_tensors="pt")["pixel_values"]
    assert (teacher_inputs[0] - own).abs().mean() < 0.1


# ------------------------------------------------------------------------------------------------------------------
# Class spaces.


@pytest.mark.parametrize(
    "teacher_labels",
    [[*LABELS, "zebu"], [*LABELS[:-1], "zebu"]],
    ids=["more-classes", "other-names"],
)
def test_teacher_with_another_class_space_fails_before_training_naming_both(tmp_path, teacher_labels):
    student = make_student()
    # The constructor raises: no step, no checkpoint, no output.
    with pytest.raises(ValueError) as error:
        DistillationTrainer(
            model=student,
            args=training_args(tmp_path),
            teacher=make_teacher(teacher_labels),
            train_dataset=ImageTensors(8, seed=0),
        )
    message = str(error.value)
    assert f"{len(teacher_labels)} classes [{', '.join(teacher_labels[:12])}" in message
    assert f"{len(LABELS)} classes [{', '.join(LABELS)}]" in message
    assert not os.listdir(tmp_path)


def test_teacher_with_the_same_names_in_another_order_is_remapped(tmp_path):
    permutation = [3, 7, 0, 9, 1, 4, 8, 2, 6, 5]
    teacher_labels = [LABELS[i] for i in permutation]  # teacher class j is student class permutation[j]
    teacher = make_teacher(teacher_labels)
    trainer = DistillationTrainer(model=make_student(), args=training_args(tmp_path), teacher=teacher)

    pixel_values = ImageTensors(6, seed=2).pixel_values
    with torch.no_grad():
        raw = teacher(pixel_values).logits
    # Student class c is teacher class permutation.index(c).
    expected = raw[:, [permutation.index(c) for c in range(len(LABELS))]]
    assert not torch.equal(expected, raw)
    assert_close(trainer.teacher_logits(pixel_values), expected)


# ------------------------------------------------------------------------------------------------------------------
# Optimizer, metrics, accumulation.


def test_weight_decay_skips_tokens_position_embedding_norms_and_biases(tmp_path):
    student = make_student()
    trainer = DistillationTrainer(model=student, args=training_args(tmp_path, weight_decay=0.05))
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in student.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}

    # The matrices of the one-block student, written out.
    assert decay == {
        "deit.embeddings.patch_embeddings.projection.weight",
        "deit.layers.0.attention.qkv_proj.weight",
        "deit.layers.0.attention.o_proj.weight",
        "deit.layers.0.mlp.fc1.weight",
        "deit.layers.0.mlp.fc2.weight",
        "cls_classifier.weight",
        "distillation_classifier.weight",
    }
    assert student.no_weight_decay() < no_decay  # timm's contract: the tokens; 1-d parameters are added
    assert {
        "deit.embeddings.cls_token",
        "deit.embeddings.distillation_token",
        "deit.embeddings.position_embeddings",
        "deit.layernorm.weight",
        "deit.layers.0.layernorm_before.bias",
        "cls_classifier.bias",
    } <= no_decay
    assert all(g["weight_decay"] in (0.0, 0.05) for g in optimizer.param_groups)


def test_evaluation_reports_every_head_the_teacher_and_agreement(tmp_path):
    student, teacher = make_student(), make_teacher()
    eval_dataset = ImageTensors(40, seed=3)
    trainer = DistillationTrainer(
        model=student,
        args=training_args(tmp_path),
        teacher=teacher,
        data_collator=DistillationCollator(),
        eval_dataset=eval_dataset,
    )
    metrics = trainer.evaluate()

    student.eval()
    with torch.no_grad():
        out = student(pixel_values=eval_dataset.pixel_values)
        z_teacher = teacher(eval_dataset.pixel_values).logits
    y = eval_dataset.labels
    average = (out.cls_logits + out.distillation_logits) / 2
    expected = {}
    for name, logits in [("cls", out.cls_logits), ("dist", out.distillation_logits), ("avg", average)]:
        expected[f"eval_{name}_top1"] = topk_accuracy(logits, y, 1)
        expected[f"eval_{name}_top5"] = topk_accuracy(logits, y, 5)
    expected["eval_teacher_top1"] = topk_accuracy(z_teacher, y, 1)
    expected["eval_teacher_top5"] = topk_accuracy(z_teacher, y, 5)
    expected["eval_agreement"] = (average.argmax(-1) == z_teacher.argmax(-1)).double().mean().item()

    assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert metrics["eval_loss"] > 0


def one_optimizer_step(output_dir, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    student = make_student()
    trainer = DistillationTrainer(
        model=student,
        # Plain SGD without clipping, so the update is proportional to the gradient (Adam's first step is not).
        args=training_args(
            output_dir,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
        ),
        teacher=make_teacher(),
        distillation_loss=DistillationLoss("hard", label_smoothing=0.1),
        data_collator=DistillationCollator(),
        train_dataset=ImageTensors(16, seed=4),
    )
    trainer.train()
    assert trainer.state.global_step == 1
    return {name: param.detach().clone() for name, param in student.named_parameters()}


def test_two_accumulated_batches_of_8_equal_one_batch_of_16(tmp_path):
    initial = dict(make_student().named_parameters())
    accumulated = one_optimizer_step(tmp_path / "ga", batch_size=8, accumulation=2)
    full = one_optimizer_step(tmp_path / "full", batch_size=16, accumulation=1)
    for name, value in full.items():
        assert (value - initial[name]).abs().max() > 1e-4 or "bias" in name, f"{name} did not move"
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------------------------
# Trainer features around distillation.


def test_periodic_eval_rotated_checkpoints_and_tensorboard_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    student, teacher = make_student(), make_teacher()
    trainer = DistillationTrainer(
        model=student,
        args=training_args(
            tmp_path,
            max_steps=3,
            eval_strategy="steps",
            eval_steps=1,
            save_strategy="steps",
            save_steps=1,
            save_total_limit=2,
            report_to="tensorboard",
        ),
        teacher=teacher,
        data_collator=DistillationCollator(),
        train_dataset=ImageTensors(24, seed=0),
        eval_dataset=ImageTensors(16, seed=1),
    )
    trainer.train()

    evals = [entry for entry in trainer.state.log_history if "eval_avg_top1" in entry]
    assert [entry["step"] for entry in evals] == [1, 2, 3]
    assert all("eval_teacher_top1" in entry for entry in evals)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    for folder in tmp_path.glob("checkpoint-*"):
        assert safetensors_keys(folder) == set(student.state_dict())

    events = glob.glob(str(tmp_path / "runs" / "*" / "events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    tags = set()
    for path in events:
        tags |= set(EventAccumulator(path).Reload().Tags()["scalars"])
    assert {"train/loss", "train/base_loss", "train/distillation_loss", "eval/avg_top1"} <= tags


@pytest.mark.slow
def test_torch_compile_trains_a_few_steps(tmp_path):
    # Measured on the 2-core CI machine: about 40 s with a cold inductor cache, 6 s with a warm one.
    student = make_student()
    trainer = DistillationTrainer(
        model=student,
        args=training_args(tmp_path, torch_compile=True, max_steps=2),
        teacher=make_teacher(),
        data_collator=DistillationCollator(),
        train_dataset=ImageTensors(16, seed=0),
    )
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_only_prepare_inputs_moves_a_batch_and_view_keys_stay_on_the_host(tmp_path, monkeypatch):
    # accelerate's DataLoaderShard sends every batch to the device (on a GPU, view keys and augment parameters
    # too); the trainer's loader must leave that to `_prepare_inputs`, which keeps `HOST_INPUTS` on the host.
    import accelerate.data_loader

    sent = []
    monkeypatch.setattr(accelerate.data_loader, "send_to_device", lambda batch, *a, **k: sent.append(batch))
    trainer = DistillationTrainer(
        model=make_student(),
        args=training_args(tmp_path, max_steps=1),
        data_collator=DistillationCollator(),
        train_dataset=ImageTensors(8, seed=0),
    )
    trainer.keep_view_keys = True
    batch = next(iter(trainer.get_train_dataloader()))
    assert not sent, "accelerate's loader moved the batch itself"
    keys = batch[VIEW_KEYS]
    prepared = trainer._prepare_inputs(dict(batch))
    assert prepared[VIEW_KEYS] is keys
    assert prepared["pixel_values"].device == trainer.args.device


def test_every_file_of_the_run_and_its_checkpoint_has_the_mode_open_gives(hard_run, tmp_path):
    # The reference: a file made here with open(), under the same umask (safetensors alone writes 0600).
    probe = tmp_path / "probe"
    probe.write_text("")
    expected = probe.stat().st_mode & 0o777
    files = [path for path in hard_run.output_dir.rglob("*") if path.is_file()]
    names = {str(path.relative_to(hard_run.output_dir)) for path in files}
    assert {"model.safetensors", "checkpoint-2/model.safetensors", "checkpoint-2/optimizer.pt"} <= names
    modes = {str(path.relative_to(hard_run.output_dir)): oct(path.stat().st_mode & 0o777) for path in files}
    assert modes == dict.fromkeys(names, oct(expected))
