"""DistillationTrainer's public surface: its docstring, `predict` on unlabelled data, and the loss settings that
travel with each checkpoint and are checked when a run resumes."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer import ImageTensors, make_student, make_teacher, training_args

from deit_distill.training.collator import DistillationCollator
from deit_distill.training.errors import UserError
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.trainer import LOSS_SETTINGS_FILE, DistillationTrainer


class Unlabelled(torch.utils.data.Dataset):
    """Images only, as a user's folder of new photos would give them."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index]}


def test_the_class_has_its_docstring():
    assert DistillationTrainer.__doc__ and DistillationTrainer.__doc__.startswith("A `transformers.Trainer`")


def test_predict_on_unlabelled_images_returns_the_models_logits_and_no_loss(tmp_path):
    student = make_student().eval()
    trainer = DistillationTrainer(
        model=student,
        args=training_args(tmp_path),
        distillation_loss=DistillationLoss("none"),
        data_collator=DistillationCollator(),
    )
    images = ImageTensors(10, seed=3).pixel_values
    output = trainer.predict(Unlabelled(images))
    with torch.no_grad():
        reference = student(pixel_values=images)
    cls_logits, dist_logits = output.predictions
    torch.testing.assert_close(torch.as_tensor(cls_logits), reference.cls_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.as_tensor(dist_logits), reference.distillation_logits, rtol=1e-5, atol=1e-6
    )
    assert output.label_ids is None
    assert "test_loss" not in output.metrics and not any("top1" in key for key in output.metrics)


def hard_trainer(output_dir, *, alpha: float, max_steps: int, **kwargs) -> DistillationTrainer:
    return DistillationTrainer(
        model=make_student(),
        args=training_args(output_dir, save_strategy="steps", save_steps=2, max_steps=max_steps),
        teacher=make_teacher(),
        distillation_loss=DistillationLoss("hard", alpha=alpha, label_smoothing=0.1),
        data_collator=DistillationCollator(),
        train_dataset=ImageTensors(32, seed=0),
        **kwargs,
    )


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("loss_settings")
    hard_trainer(output_dir, alpha=0.5, max_steps=2).train()
    return output_dir


def test_each_checkpoint_records_the_loss_settings(checkpointed):
    saved = json.loads((checkpointed / "checkpoint-2" / LOSS_SETTINGS_FILE).read_text())
    assert saved == {
        "distillation_type": "hard",
        "alpha": 0.5,
        "tau": 1.0,
        "kl_reduction": "numel",
        "label_smoothing": 0.1,
    }


def test_resuming_with_another_alpha_is_refused_in_one_line_naming_it(checkpointed):
    trainer = hard_trainer(checkpointed, alpha=0.9, max_steps=3)
    with pytest.raises(UserError) as raised:
        trainer.train(resume_from_checkpoint=str(checkpointed / "checkpoint-2"))
    message = str(raised.value)
    assert "\n" not in message and "alpha 0.5 -> 0.9" in message and "--allow_loss_change" in message
    assert trainer.state.global_step == 0  # refused before any step
    assert not (checkpointed / "checkpoint-3").exists()


def test_resuming_with_another_alpha_goes_on_when_allowed(checkpointed, tmp_path):
    trainer = hard_trainer(tmp_path, alpha=0.9, max_steps=3, allow_loss_change=True)
    trainer.train(resume_from_checkpoint=str(checkpointed / "checkpoint-2"))
    assert trainer.state.global_step == 3
    assert json.loads((tmp_path / "checkpoint-3" / LOSS_SETTINGS_FILE).read_text())["alpha"] == 0.9
