"""Every expected user error gets one clear line (`deit-distill: error: ...`) naming the flag or file, before
anything is written; and every command takes both flag spellings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from PIL import Image

from deit_distill.training.commands import convert, hub, predict
from deit_distill.training.commands.cli import main as cli

TINY = [
    "--config_overrides", "patch_size=8,hidden_size=16,num_hidden_layers=1,num_attention_heads=2",
    "--image_size", "16",
    "--max_steps", "1",
    "--per_device_train_batch_size", "4",
    "--distillation_type", "none",
    "--use_cpu", "true",
    "--report_to", "none",
    "--save_strategy", "no",
    "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    rng = np.random.default_rng(0)
    for name in ("circle", "square"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing was printed"
    last = err[-1]
    assert last.startswith("deit-distill: error: "), err
    assert not any(line.startswith("Traceback") for line in err)
    return last


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--learning_rate", "-1"], "--learning_rate must be > 0"),
        (["--num_train_epochs", "0", "--max_steps", "-1"], "--num_train_epochs must be > 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
        (["--alpha", "1.5", "--distillation_type", "hard", "--teacher", "x/y"], "--alpha must be in [0, 1]"),
        (["--tau", "0", "--distillation_type", "soft", "--teacher", "x/y"], "--tau must be > 0"),
        (["--image_size", "0"], "--image_size must be a positive size"),
        (["--mixup", "-0.2"], "--mixup alpha must be >= 0"),
        (["--augmentation", "strong"], "--augmentation must be one of deit, light, none"),
        (["--distillation_type", "hard"], "--distillation_type hard needs --teacher"),
        (["--max_train_samples", "0"], "--max_train_samples must be a positive number"),
    ],
)
def test_out_of_range_values_name_their_flag_before_anything_is_written(
    folder, tmp_path, capsys, flags, named
):
    output_dir = tmp_path / "run"
    status = cli(["train", "--dataset_name", str(folder), *TINY, *flags, "--output_dir", str(output_dir)])
    assert status == 2
    assert named in error_line(capsys)
    assert not output_dir.exists()


def test_a_missing_local_dataset_folder_says_so(tmp_path, capsys):
    assert (
        cli(["train", "--dataset_name", str(tmp_path / "nope"), *TINY, "--output_dir", str(tmp_path / "o")])
        == 2
    )
    assert f"--dataset_name {tmp_path / 'nope'}: no such folder" in error_line(capsys)


def test_an_empty_class_folder_is_an_error_naming_it(folder, tmp_path, capsys):
    data = tmp_path / "shapes"
    for name in ("circle", "square"):
        (data / name).mkdir(parents=True)
        for file in (folder / name).iterdir():
            (data / name / file.name).write_bytes(file.read_bytes())
    (data / "triangle").mkdir()
    assert cli(["train", "--dataset_name", str(data), *TINY, "--output_dir", str(tmp_path / "o")]) == 2
    assert f"{data / 'triangle'} is empty" in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_missing_teacher_path_says_so(folder, tmp_path, capsys):
    missing = tmp_path / "teachers" / "resnet"
    flags = ["--distillation_type", "hard", "--teacher", str(missing), "--output_dir", str(tmp_path / "o")]
    assert cli(["train", "--dataset_name", str(folder), *TINY, *flags]) == 2
    assert f"--teacher {missing}: no such folder" in error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(
    not huggingface_hub.constants.HF_HUB_OFFLINE, reason="a relative id would be tried on the Hub"
)
def test_a_missing_relative_teacher_path_says_so(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "runs/teacher" is also a well-formed Hub id
    flags = ["--distillation_type", "hard", "--teacher", "runs/teacher", "--output_dir", str(tmp_path / "o")]
    assert cli(["train", "--dataset_name", str(folder), *TINY, *flags]) == 2
    # Offline, a Hub id that is not in the local cache is said before the data loads.
    line = error_line(capsys)
    assert (
        "--teacher runs/teacher: no such folder here, and as a Hub id it is not in the local Hub cache"
        in line
    )
    assert not (tmp_path / "o").exists()


def test_a_finished_run_is_not_overwritten_unless_asked(folder, tmp_path, capsys):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-7").mkdir(parents=True)
    (output_dir / "config.json").write_text("{}")
    run = ["train", "--dataset_name", str(folder), *TINY, "--output_dir", str(output_dir)]
    assert cli(run) == 2
    assert "holds a finished run (config.json)" in error_line(capsys)
    assert (output_dir / "config.json").read_text() == "{}" and (output_dir / "checkpoint-7").is_dir()

    assert cli([*run, "--overwrite_output_dir", "true"]) == 0
    assert not (
        output_dir / "checkpoint-7"
    ).exists()  # nothing of the old run is left to mix with the new one
    assert (output_dir / "deit_distill_run.json").is_file()


def test_checkpoints_of_an_unfinished_run_ask_to_resume_or_overwrite(folder, tmp_path, capsys):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-3").mkdir(parents=True)
    assert cli(["train", "--dataset_name", str(folder), *TINY, "--output_dir", str(output_dir)]) == 2
    line = error_line(capsys)
    assert "--resume_from_checkpoint true" in line and "--overwrite_output_dir true" in line


def test_the_console_script_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    command = [str(Path(sys.executable).with_name("deit-distill")), "train", "--learning_rate", "-1", *TINY]
    command += ["--output_dir", str(tmp_path / "o")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1] == "deit-distill: error: --learning_rate must be > 0, got -1.0."
    )
    assert "Traceback" not in done.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_eval_and_predict_name_a_missing_model(tmp_path, capsys):
    assert cli(["eval", str(tmp_path / "run")]) == 2
    assert "no such run, model folder or file" in error_line(capsys)
    assert cli(["predict", str(tmp_path / "run"), "x.png"]) == 2
    assert "predict: " in (line := error_line(capsys)) and "no such run, model folder or file" in line


@pytest.mark.parametrize(
    ("parser", "underscored", "dashed", "field"),
    [
        (predict.build_parser, ["m", "a.png", "--top_k", "4"], ["m", "a.png", "--top-k", "4"], "top_k"),
        (hub.build_parser, ["push", "r", "--repo_id", "a/b"], ["push", "r", "--repo-id", "a/b"], "repo_id"),
        (hub.build_parser, ["card", "r", "--repo_id", "a/b"], ["card", "r", "--repo-id", "a/b"], "repo_id"),
        (
            convert.build_parser,
            ["--from", "timm", "--source", "s", "--output", "o", "--num_attention_heads", "3"],
            ["--from", "timm", "--source", "s", "--output", "o", "--num-attention-heads", "3"],
            "num_attention_heads",
        ),
    ],
)
def test_every_command_takes_both_flag_spellings(parser, underscored, dashed, field):
    assert getattr(parser().parse_args(underscored), field) == getattr(parser().parse_args(dashed), field)
