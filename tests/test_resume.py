"""Resuming after a crash: a run SIGKILLed while it writes a checkpoint, or in the middle of an epoch, resumes from
its last complete checkpoint and is the uninterrupted run: the same loss at every logged step, the same weights
and optimizer state. Partial checkpoint folders are skipped and left alone.

The runs use the full DeiT recipe (RandomResizedCrop, RandAugment, random erasing, Mixup/CutMix, drop path) with
2 data-loader workers: every view and every mixed batch is a function of (seed, epoch, index/batch), so a resumed
run replays exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from processes import kill_when_stalled
from safetensors.torch import load_file

from deit_distill.training.commands.train import main
from deit_distill.training.trainer import (
    DistillationTrainer,
    checkpoint_format,
    last_complete_checkpoint,
    rotate_checkpoints,
)

ROOT = Path(__file__).resolve().parent.parent
# 64 images in batches of 16: 4 steps per epoch, so the 6 steps cross an epoch boundary.
MAX_STEPS, SAVE_STEPS, KILL_AT = 6, 2, 4
RUN = [
    "--config_overrides", "patch_size=7,hidden_size=24,num_hidden_layers=1,num_attention_heads=2",
    "--drop_path_rate", "0.1",
    "--distillation_type", "none",
    "--max_train_samples", "64",
    "--max_eval_samples", "32",
    "--image_size", "28",
    "--crop_pct", "1.0",
    "--augmentation", "deit",
    "--mixup", "0.8",
    "--cutmix", "1.0",
    "--dataloader_num_workers", "2",
    "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "32",
    "--max_steps", str(MAX_STEPS),
    "--save_strategy", "steps",
    "--save_steps", str(SAVE_STEPS),
    "--logging_steps", "1",
    "--learning_rate", "0.001",
    "--seed", "0",
    "--use_cpu", "true",
    "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip

# Runs train.py's `main`, but stalls at step KILL_AT: with "save", inside its checkpoint save, after the weights are
# written and before the optimizer, scheduler and trainer state are; with "step", in the middle of the training
# step that follows it (mid-epoch). There the parent kills it.
KILLABLE_RUN = textwrap.dedent(
    """
    import sys, time
    from deit_distill.training.trainer import DistillationTrainer
    from deit_distill.training.commands.train import main

    marker, where, kill_at, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    save, step = DistillationTrainer._save_optimizer_and_scheduler, DistillationTrainer.training_step

    def stall(self):
        if self.state.global_step == kill_at:
            open(marker, "w").write("stalled")
            time.sleep(600)

    def save_or_stall(self, output_dir):
        if where == "save":
            stall(self)
        return save(self, output_dir)

    def step_or_stall(self, *args, **kwargs):
        if where == "step":
            stall(self)
        return step(self, *args, **kwargs)

    DistillationTrainer._save_optimizer_and_scheduler = save_or_stall
    DistillationTrainer.training_step = step_or_stall
    main(argv)
    """
)


def file_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def kill_run(output_dir: Path, where: str, kill_at: int) -> Path:
    """Start the run in a subprocess, SIGKILL it where it stalls (see KILLABLE_RUN), return its folder."""
    marker = output_dir.parent / f"{output_dir.name}.stalled"
    command = [
        sys.executable,
        "-c",
        KILLABLE_RUN,
        str(marker),
        where,
        str(kill_at),
        *RUN,
        "--output_dir",
        str(output_dir),
    ]
    kill_when_stalled(command, marker, f"the run (stall at step {kill_at}, {where})")
    return output_dir


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A run SIGKILLed while writing its second checkpoint (checkpoint-4); the folder it left behind."""
    return kill_run(tmp_path_factory.mktemp("killed") / "run", "save", KILL_AT)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    main([*RUN, "--output_dir", str(output_dir)])
    return output_dir


def logged_losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def assert_same_run(resumed_dir: Path, uninterrupted_dir: Path) -> None:
    """Every logged loss, the final weights and the last optimizer state are those of the uninterrupted run."""
    for folder in (resumed_dir, uninterrupted_dir):
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    resumed_losses, losses = logged_losses(resumed_dir), logged_losses(uninterrupted_dir)
    assert sorted(resumed_losses) == sorted(losses) == list(range(1, MAX_STEPS + 1))
    for step, loss in losses.items():
        assert resumed_losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    resumed_weights = load_file(resumed_dir / "model.safetensors")
    for name, value in load_file(uninterrupted_dir / "model.safetensors").items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
    last = f"checkpoint-{MAX_STEPS}"
    resumed_optimizer = torch.load(resumed_dir / last / "optimizer.pt", weights_only=True)
    uninterrupted_optimizer = torch.load(uninterrupted_dir / last / "optimizer.pt", weights_only=True)
    for index, state in uninterrupted_optimizer["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(resumed_optimizer["state"][index][key], value, rtol=1e-5, atol=1e-8)


def test_kill_during_a_save_leaves_a_partial_checkpoint_that_is_skipped(killed_run):
    assert sorted(path.name for path in killed_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    partial = killed_run / "checkpoint-4"
    assert (partial / "model.safetensors").is_file()
    assert not (partial / "optimizer.pt").exists() and not (partial / "trainer_state.json").exists()
    assert last_complete_checkpoint(killed_run) == str(killed_run / "checkpoint-2")


@pytest.mark.parametrize("damage", ["truncated-state", "no-optimizer", "no-weights"])
def test_partial_copy_of_a_checkpoint_is_skipped_and_the_previous_one_kept_intact(
    killed_run, tmp_path, damage
):
    run = shutil.copytree(killed_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoint-4")
    complete = run / "checkpoint-2"
    before = file_hashes(complete)
    # Step 10 sorts before step 2 as text: the lookup must compare step numbers.
    partial = shutil.copytree(complete, run / "checkpoint-10")
    if damage == "truncated-state":
        state = (partial / "trainer_state.json").read_text()
        (partial / "trainer_state.json").write_text(state[: len(state) // 2])
    elif damage == "no-optimizer":
        (partial / "optimizer.pt").unlink()
    else:
        (partial / "model.safetensors").unlink()

    assert last_complete_checkpoint(run) == str(complete)
    assert file_hashes(complete) == before
    # The undamaged copy is the newest complete checkpoint.
    shutil.rmtree(partial)
    shutil.copytree(complete, run / "checkpoint-10")
    assert last_complete_checkpoint(run) == str(run / "checkpoint-10")


def test_no_checkpoint_means_none(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    (tmp_path / "checkpoint-3").mkdir()
    assert last_complete_checkpoint(tmp_path) is None


@pytest.mark.slow
def test_resumed_run_continues_from_the_last_complete_checkpoint_and_ends_like_an_uninterrupted_run(
    killed_run, uninterrupted_run, tmp_path, monkeypatch
):
    resumed_dir = shutil.copytree(killed_run, tmp_path / "resumed")
    saved_optimizer = torch.load(resumed_dir / "checkpoint-2" / "optimizer.pt", weights_only=True)

    loaded = {}
    load = DistillationTrainer._load_optimizer_and_scheduler

    def record_load(self, checkpoint):
        load(self, checkpoint)
        if checkpoint is not None:
            loaded["checkpoint"] = checkpoint
            loaded["step"] = self.state.global_step
            loaded["optimizer"] = copy.deepcopy(self.optimizer.state_dict())

    monkeypatch.setattr(DistillationTrainer, "_load_optimizer_and_scheduler", record_load)
    main([*RUN, "--output_dir", str(resumed_dir), "--resume_from_checkpoint", "true"])
    monkeypatch.undo()

    # It restarted from checkpoint-2 (mid-epoch) with exactly the optimizer state saved there.
    assert loaded["checkpoint"] == str(resumed_dir / "checkpoint-2")
    assert loaded["step"] == 2
    assert loaded["optimizer"]["state"].keys() == saved_optimizer["state"].keys()
    for index, state in saved_optimizer["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(loaded["optimizer"]["state"][index][key], value, rtol=0, atol=0)

    assert_same_run(resumed_dir, uninterrupted_run)


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_at_the_epoch_boundary_and_ends_like_an_uninterrupted_run(
    uninterrupted_run, tmp_path
):
    # Killed inside step 5, the second step of epoch 1; checkpoint-4 closed epoch 0.
    killed = kill_run(tmp_path / "run", "step", KILL_AT)
    assert last_complete_checkpoint(killed) == str(killed / f"checkpoint-{KILL_AT}")
    main([*RUN, "--output_dir", str(killed), "--resume_from_checkpoint", "true"])
    assert_same_run(killed, uninterrupted_run)


# ------------------------------------------------------------------------------------------------------------------
# Every layout Trainer writes under the shipped launchers. The names come from the writers' own code: FSDP's from
# accelerate (`save_fsdp_model` / `save_fsdp_optimizer`, names from accelerate.utils.constants), sharded ones as
# torch.distributed.checkpoint writes them (here for real, in one process), DeepSpeed's as its engine's
# `save_checkpoint` names them (deepspeed is not installed here; bench/gpu_check.py's `resume` section writes all of
# these for real on a GPU and resumes from them).


def write_trainer_files(folder: Path, step: int, scheduler: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    torch.save({}, folder / "training_args.bin")
    torch.save({}, folder / "rng_state.pth")
    if scheduler:
        torch.save({"last_epoch": step}, folder / "scheduler.pt")


def write_checkpoint(folder: Path, layout: str, step: int) -> None:
    import torch.distributed.checkpoint as dcp
    from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME
    from safetensors.torch import save_file

    weights = {"w": torch.ones(2, 2)}
    optimizer = {"state": {0: {"exp_avg": torch.zeros(2, 2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    write_trainer_files(folder, step, scheduler=layout != "deepspeed")
    if layout == "plain":
        save_file(weights, folder / "model.safetensors")
        torch.save(optimizer, folder / "optimizer.pt")
    elif layout == "fsdp-full":  # FULL_STATE_DICT: Trainer.save_model's safetensors, then accelerate's files
        save_file(weights, folder / "model.safetensors")
        torch.save(weights, folder / f"{FSDP_MODEL_NAME}.bin")
        torch.save(optimizer, folder / f"{OPTIMIZER_NAME}.bin")
    elif layout == "fsdp-sharded":  # SHARDED_STATE_DICT through DCP: no weights file at the top
        dcp.save({"model": weights}, storage_writer=dcp.FileSystemWriter(folder / f"{FSDP_MODEL_NAME}_0"))
        dcp.save(
            {"optimizer": optimizer}, storage_writer=dcp.FileSystemWriter(folder / f"{OPTIMIZER_NAME}_0")
        )
    elif (
        layout == "deepspeed"
    ):  # engine.save_checkpoint(folder): tag folder, then `latest`; ZeRO-2 bf16 names
        save_file(weights, folder / "model.safetensors")
        state = folder / f"global_step{step}"
        state.mkdir()
        torch.save({"module": weights}, state / "mp_rank_00_model_states.pt")
        for rank in range(2):
            torch.save(optimizer, state / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        (folder / "latest").write_text(f"global_step{step}")
    else:
        raise ValueError(layout)


# How each layout looks when the save was cut short (trainer_state.json is written last, so a cut before it leaves
# none; these are cuts in the parts that other processes or the engine write).
DAMAGE = {
    "plain": lambda folder: (folder / "optimizer.pt").unlink(),
    "fsdp-full": lambda folder: (folder / "optimizer.bin").unlink(),
    "fsdp-sharded": lambda folder: (folder / "optimizer_0" / ".metadata").unlink(),
    "deepspeed": lambda folder: (folder / "latest").unlink(),
}


@pytest.mark.parametrize("layout", sorted(DAMAGE))
def test_each_checkpoint_layout_is_recognised_and_a_partial_one_skipped(tmp_path, layout):
    write_checkpoint(tmp_path / "checkpoint-3", layout, 3)
    write_checkpoint(tmp_path / "checkpoint-6", layout, 6)
    assert checkpoint_format(tmp_path / "checkpoint-6") == layout
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")

    DAMAGE[layout](tmp_path / "checkpoint-6")
    assert checkpoint_format(tmp_path / "checkpoint-6") is None
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    # A truncated trainer state makes any layout incomplete.
    state = tmp_path / "checkpoint-3" / "trainer_state.json"
    state.write_text(state.read_text()[:-3])
    assert last_complete_checkpoint(tmp_path) is None


def test_deepspeed_checkpoint_whose_latest_names_a_missing_or_empty_step_is_incomplete(tmp_path):
    folder = tmp_path / "checkpoint-4"
    write_checkpoint(folder, "deepspeed", 4)
    (folder / "latest").write_text("global_step5")
    assert checkpoint_format(folder) is None
    (folder / "latest").write_text("global_step4")
    for path in (folder / "global_step4").glob("*optim_states.pt"):
        path.unlink()
    assert checkpoint_format(folder) is None


def test_rotation_keeps_the_newest_complete_checkpoints_by_step_whatever_their_times(tmp_path):
    import os

    from transformers.trainer_utils import rotate_checkpoints as transformers_rotate

    def layout() -> Path:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        for step in (2, 4, 8):
            write_checkpoint(run / f"checkpoint-{step}", "fsdp-sharded", step)
        (run / "checkpoint-1").mkdir()  # a partial folder older than the progress
        (run / "checkpoint-10").mkdir()  # a save cut short after checkpoint-8
        # checkpoint-2 was touched last (e.g. copied back): newest by time, oldest by step.
        for step, stamp in ((1, 10), (2, 50), (4, 20), (8, 30), (10, 40)):
            os.utime(run / f"checkpoint-{step}", (1_000_000 + stamp, 1_000_000 + stamp))
        return run

    # transformers' own rotation (by time, counting partial folders) deletes the real progress here.
    reference = layout()
    transformers_rotate(str(reference), save_total_limit=2, use_mtime=True)
    assert not (reference / "checkpoint-8").exists()

    run = layout()
    rotate_checkpoints(run, 2)
    assert sorted(path.name for path in run.iterdir()) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]
    assert last_complete_checkpoint(run) == str(run / "checkpoint-8")
    rotate_checkpoints(run, 1, keep=(str(run / "checkpoint-4"),))  # e.g. the best model
    assert sorted(path.name for path in run.iterdir()) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]
    rotate_checkpoints(run, 1)
    assert sorted(path.name for path in run.iterdir()) == ["checkpoint-10", "checkpoint-8"]
