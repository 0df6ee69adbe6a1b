"""Resuming after a crash: a run SIGKILLed while it writes a checkpoint resumes from its last complete checkpoint
and ends where an uninterrupted run ends; partial checkpoint folders are skipped and left alone.

The run is deterministic (no augmentation, mixup, cutmix or drop-path; fixed seed), so a resumed run can be
compared with an uninterrupted one parameter by parameter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.train import main
from training.trainer import DistillationTrainer, last_complete_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# 64 images in batches of 16: 4 steps per epoch, so the 6 steps cross an epoch boundary.
MAX_STEPS, SAVE_STEPS, KILL_AT = 6, 2, 4
RUN = [
    "--config_overrides", "patch_size=7,hidden_size=24,num_hidden_layers=1,num_attention_heads=2",
    "--drop_path_rate", "0",
    "--distillation_type", "none",
    "--max_train_samples", "64",
    "--max_eval_samples", "32",
    "--image_size", "28",
    "--crop_pct", "1.0",
    "--augmentation", "none",
    "--mixup", "0",
    "--cutmix", "0",
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

# Runs train.py's `main`, but stalls inside the checkpoint save of step KILL_AT after the weights are written and
# before the optimizer, scheduler and trainer state are: there the parent kills it.
KILLABLE_RUN = textwrap.dedent(
    """
    import sys, time
    from training.trainer import DistillationTrainer
    from training.train import main

    marker, kill_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    save = DistillationTrainer._save_optimizer_and_scheduler

    def save_or_stall(self, output_dir):
        if self.state.global_step == kill_at:
            open(marker, "w").write(output_dir)
            time.sleep(600)
        return save(self, output_dir)

    DistillationTrainer._save_optimizer_and_scheduler = save_or_stall
    main(argv)
    """
)


def file_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A run SIGKILLed while writing its second checkpoint (checkpoint-4); the folder it left behind."""
    root = tmp_path_factory.mktemp("killed")
    output_dir, marker = root / "run", root / "saving"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLABLE_RUN,
            str(marker),
            str(KILL_AT),
            *RUN,
            "--output_dir",
            str(output_dir),
        ],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended before it was killed:\n{process.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach the checkpoint save of step 4 in time")
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return output_dir


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
    killed_run, tmp_path, monkeypatch
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

    # It restarted from checkpoint-2 with exactly the optimizer state saved there.
    assert loaded["checkpoint"] == str(resumed_dir / "checkpoint-2")
    assert loaded["step"] == 2
    assert loaded["optimizer"]["state"].keys() == saved_optimizer["state"].keys()
    for index, state in saved_optimizer["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(loaded["optimizer"]["state"][index][key], value, rtol=0, atol=0)

    uninterrupted_dir = tmp_path / "uninterrupted"
    main([*RUN, "--output_dir", str(uninterrupted_dir)])

    for folder in (resumed_dir, uninterrupted_dir):
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    last = f"checkpoint-{MAX_STEPS}"
    resumed_weights = load_file(resumed_dir / "model.safetensors")
    for name, value in load_file(uninterrupted_dir / "model.safetensors").items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
    resumed_optimizer = torch.load(resumed_dir / last / "optimizer.pt", weights_only=True)
    uninterrupted_optimizer = torch.load(uninterrupted_dir / last / "optimizer.pt", weights_only=True)
    for index, state in uninterrupted_optimizer["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(resumed_optimizer["state"][index][key], value, rtol=1e-5, atol=1e-8)
