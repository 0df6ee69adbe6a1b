"""A specification of user mistakes, table by table: each file the project reads missing, empty, truncated, of
random bytes or of the wrong kind; recipes; misspelt flags for every command; out-of-range and ineffective
settings; two runs on one output folder; interrupted commands.

Each case asserts the exit status, the one line the user sees (no traceback), and that nothing was written or
changed: the whole working folder is snapshotted before and after. Commands run in-process through
`cli.main([...])`; the cases where the exit path itself matters (a real Ctrl-C, a second live process) run as
subprocesses and are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit_distill.training.arguments import check_settings_take_effect
from deit_distill.training.commands.cli import main as cli
from deit_distill.training.commands.train import parse_args
from deit_distill.training.errors import UserError
from deit_distill.training.folder_lock import LOCK_FILE
from deit_distill.training.run_record import RUN_RECORD_FILE, RunRecord

TINY = [
    "--image_size", "16",
    "--max_steps", "1",
    "--per_device_train_batch_size", "4",
    "--use_cpu", "true",
    "--report_to", "none",
    "--save_strategy", "no",
    "--disable_tqdm", "true",
]  # fmt: skip
SCRATCH = ["--config_overrides", "patch_size=8,hidden_size=16,num_hidden_layers=1,num_attention_heads=2"]
NO_TEACHER = ["--distillation_type", "none"]


# --------------------------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    rng = np.random.default_rng(0)
    for name in ("circle", "square"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory, data) -> Path:
    """A finished tiny run: a model for eval/predict, and a teacher for train."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert (
        cli(["train", "--dataset_name", str(data), *TINY, *SCRATCH, *NO_TEACHER, "--output_dir", str(run)])
        == 0
    )
    return run


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """A text model saved locally: the wrong kind of model for every command."""
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("text") / "bert"
    config = BertConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data, model) -> Path:
    path = tmp_path_factory.mktemp("caches") / "cache"
    flags = [
        "--dataset_name",
        str(data),
        *TINY,
        *SCRATCH,
        "--teacher",
        str(model),
        "--teacher_cache",
        str(path),
    ]
    assert cli(["cache-teacher", *flags, "--output_dir", str(path.parent / "unused")]) == 0
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with its contents' hash: equal snapshots mean nothing was written."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        if path.is_file()
        else "dir"
        for path in sorted(root.rglob("*"))
    }


def one_error_line(capsys, prefix: str = "deit-distill: error: ") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines, "nothing was printed"
    assert lines[-1].startswith(prefix), lines
    return lines[-1]


def expect_refusal(capsys, work: Path, argv: list[str], *fragments: str, status: int = 2) -> str:
    """Run `argv` from `work`; assert the status, one line holding every fragment, and an unchanged `work`."""
    before = snapshot(work)
    assert cli(argv) == status
    line = one_error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert snapshot(work) == before
    return line


# ------------------------------------------------------------------------------------- damaged model files
def _missing(path: Path) -> None:
    path.unlink()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(2048))


DAMAGES: dict[str, Callable[[Path], None]] = {
    "missing": _missing,
    "empty": _empty,
    "truncated": _truncated,
    "random_bytes": _random_bytes,
}
# (file, damage) -> what the line says about that file.
MODEL_FILE_CASES = [
    ("model.safetensors", "missing", "the folder has no weights"),
    ("model.safetensors", "empty", "model.safetensors is empty"),
    ("model.safetensors", "truncated", "model.safetensors is truncated"),
    ("model.safetensors", "random_bytes", "model.safetensors is not a safetensors file"),
    ("config.json", "missing", "the folder has no config.json"),
    ("config.json", "empty", "config.json is empty"),
    ("config.json", "truncated", "config.json is not valid JSON"),
    ("config.json", "random_bytes", "config.json is not"),
    ("preprocessor_config.json", "empty", "preprocessor_config.json is empty"),
    ("preprocessor_config.json", "truncated", "preprocessor_config.json is not valid JSON"),
    ("preprocessor_config.json", "random_bytes", "preprocessor_config.json is not"),
]
# How each command is given a model folder.
CONSUMERS: dict[str, Callable[[Path, Path, Path], list[str]]] = {
    "eval": lambda model, data, out: ["eval", str(model)],
    "predict": lambda model, data, out: ["predict", str(model), str(data / "circle" / "0.png")],
    "export": lambda model, data, out: ["export", str(model), "--output", str(out)],
    "analyze": lambda model, data, out: ["analyze", str(model), "--json"],
    "push": lambda model, data, out: ["push", str(model), "--repo_id", "me/tiny"],
    "train --model_name_or_path": lambda model, data, out: [
        "train", "--dataset_name", str(data), *TINY, *NO_TEACHER, "--model_name_or_path", str(model),
        "--output_dir", str(out),
    ],
    "train --teacher": lambda model, data, out: [
        "train", "--dataset_name", str(data), *TINY, *SCRATCH, "--teacher", str(model), "--output_dir", str(out),
    ],
}  # fmt: skip


@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize(("file", "damage", "said"), MODEL_FILE_CASES)
def test_a_damaged_model_file_is_named_in_one_line(
    model, data, tmp_path, capsys, monkeypatch, consumer, file, damage, said
):
    work = tmp_path / "work"
    shutil.copytree(model, work / "model")
    DAMAGES[damage](work / "model" / file)
    monkeypatch.chdir(work)  # anything written by mistake into the working folder shows in the snapshot
    argv = CONSUMERS[consumer](work / "model", data, work / "out")
    flag = consumer.split()[1:]  # train takes two models: the line says which flag the damaged one came from
    expect_refusal(capsys, work, argv, said, str(work / "model"), *flag)


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_a_text_model_is_named_as_such(text_model, data, tmp_path, capsys, monkeypatch, consumer):
    work = tmp_path / "work"
    shutil.copytree(text_model, work / "bert")
    monkeypatch.chdir(work)
    argv = CONSUMERS[consumer](work / "bert", data, work / "out")
    expect_refusal(capsys, work, argv, "is a bert text model, not an image classifier")


@pytest.mark.parametrize("consumer", [name for name in CONSUMERS if name != "train --model_name_or_path"])
def test_a_file_given_as_a_model_folder_is_named(data, tmp_path, capsys, monkeypatch, consumer):
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.json").write_text("{}")
    monkeypatch.chdir(work)
    argv = CONSUMERS[consumer](work / "model.json", data, work / "out")
    expect_refusal(capsys, work, argv, f"{work / 'model.json'} is a file; give a model folder")


@pytest.mark.parametrize(("damage", "said"), [("empty", "is empty"), ("truncated", "is truncated")])
def test_a_damaged_pytorch_bin_is_named(model, data, tmp_path, capsys, monkeypatch, damage, said):
    from safetensors.torch import load_file

    work = tmp_path / "work"
    shutil.copytree(model, work / "model")
    weights = work / "model" / "model.safetensors"
    torch.save(load_file(weights), work / "model" / "pytorch_model.bin")
    weights.unlink()
    DAMAGES[damage](work / "model" / "pytorch_model.bin")
    monkeypatch.chdir(work)
    expect_refusal(capsys, work, ["eval", str(work / "model")], f"pytorch_model.bin {said}")


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("empty", "is empty"),
        ("truncated", "is truncated"),
        ("random_bytes", "cannot read the weights"),
        ("not_a_vit", "not a timm/DeiT ViT state dict"),
    ],
)
def test_a_damaged_state_dict_file_is_named(data, tmp_path, capsys, monkeypatch, damage, said):
    work = tmp_path / "work"
    work.mkdir()
    state_dict = work / "deit.pth"
    torch.save({"head.weight": torch.zeros(2, 4), "head.bias": torch.zeros(2)}, state_dict)
    if damage != "not_a_vit":
        DAMAGES[damage](state_dict)
    monkeypatch.chdir(work)
    argv = ["train", "--dataset_name", str(data), *TINY, *NO_TEACHER, "--model_name_or_path", str(state_dict)]
    expect_refusal(capsys, work, [*argv, "--output_dir", str(work / "out")], str(state_dict), said)


# ------------------------------------------------------------------------------------------ teacher caches
@pytest.mark.parametrize(
    ("target", "damage", "said"),
    [
        ("teacher_cache.json", "missing", "no teacher_cache.json"),
        ("teacher_cache.json", "empty", "teacher_cache.json is empty"),
        ("teacher_cache.json", "truncated", "teacher_cache.json is not valid JSON"),
        ("shard", "truncated", "is damaged"),
        ("shard", "random_bytes", "is damaged"),
    ],
)
def test_a_damaged_teacher_cache_is_named(cache, data, tmp_path, capsys, monkeypatch, target, damage, said):
    work = tmp_path / "work"
    shutil.copytree(cache, work / "cache")
    shard = sorted((work / "cache").rglob("*.parquet"))[0]
    damaged = shard if target == "shard" else work / "cache" / target
    DAMAGES[damage](damaged)
    monkeypatch.chdir(work)
    argv = ["train", "--dataset_name", str(data), *TINY, *SCRATCH, "--teacher_cache", str(work / "cache")]
    line = expect_refusal(capsys, work, [*argv, "--output_dir", str(work / "out")], said)
    assert str(damaged if target == "shard" else work / "cache") in line


# ------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "no such file"),
        ("", "is empty"),
        ('{"max_steps": 1,', "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"max_stepz": 3}', "unknown flag --max_stepz in the recipe"),
        ('{"label_smoothing_factor": 0.1}', "use --label_smoothing"),
    ],
)
def test_a_bad_recipe_is_named_in_one_line(data, tmp_path, capsys, monkeypatch, content, said):
    recipe = tmp_path / "recipe.json"
    if content is not None:
        recipe.write_text(content)
    monkeypatch.chdir(tmp_path)
    argv = ["train", str(recipe), "--dataset_name", str(data), *TINY, "--output_dir", str(tmp_path / "out")]
    line = expect_refusal(capsys, tmp_path, argv, said, str(recipe))
    if content and "max_stepz" in content:
        assert line.endswith("did you mean --max_steps?")


# --------------------------------------------------------------------------------------------- flag mistakes
MISSPELT = [
    (["train", "--max_stepz", "3"], "--max_stepz", "--max_steps"),
    (["train", "--learning-rat", "0.1"], "--learning_rat", "--learning_rate"),
    (["cache-teacher", "--teacher_cach", "c"], "--teacher_cach", "--teacher_cache"),
    (["eval", "{model}", "--batch_sise", "3"], "--batch_sise", "--batch_size"),
    (["analyze", "{model}", "--jsn"], "--jsn", "--json"),
    (["predict", "{model}", "x.png", "--top_kk", "2"], "--top_kk", "--top_k"),
    (["export", "{model}", "--outpt", "o"], "--outpt", "--output"),
    (["convert", "--from", "timm", "--source", "s", "--outptu", "o"], "--outptu", "--output"),
    (["card", "{model}", "--repo_idd", "a/b"], "--repo_idd", "--repo_id"),
    (["push", "{model}", "--repo-idd", "a/b"], "--repo_idd", "--repo_id"),
    (["push-cache", "c", "--repo_id", "a/b", "--privat"], "--privat", "--private"),
    (["demo", "--output_dirr", "o"], "--output_dirr", "--output_dir"),
    # Names from other tools: too far for a spelling match, known by name.
    (["train", "--lr", "0.1"], "--lr", "--learning_rate"),
    (["train", "--epochs", "3"], "--epochs", "--num_train_epochs"),
    (["train", "--batch_size", "3"], "--batch_size", "--per_device_train_batch_size"),
]


@pytest.mark.parametrize(("argv", "given", "meant"), MISSPELT, ids=[case[0][0] for case in MISSPELT])
def test_a_misspelt_flag_names_the_nearest_one_for_every_command(
    model, tmp_path, capsys, monkeypatch, argv, given, meant
):
    monkeypatch.chdir(tmp_path)
    argv = [str(model) if arg == "{model}" else arg for arg in argv]
    line = expect_refusal(capsys, tmp_path, argv)
    assert line == f"deit-distill: error: unknown flag {given}; did you mean {meant}?"


OUT_OF_RANGE = [
    (["--per_device_train_batch_size", "1"], "--per_device_train_batch_size 1 cannot mix images"),
    (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor is not used by deit-distill: use --label_smoothing"),
    (["--do_eval", "true"], "--do_eval is not used by deit-distill"),
    (["--no_remove_unused_columns"], "--remove_unused_columns is not used by deit-distill"),
    (["--max_steps", "abc"], "argument --max_steps: invalid int value: 'abc'"),
    (["--overwrite_output_dir", "true", "--resume_from_checkpoint", "true"], "use one of them"),
    (["--mixup_prob", "2"], "--mixup_prob must be in [0, 1]"),
    (["--cache_dtype", "int8"], "--cache_dtype must be float16 or float32"),
    (["stray"], "unexpected argument 'stray'"),
    # Values a library refuses (TrainingArguments, the model config, the DataLoader) name their flag, in one line.
    (["--warmup_steps", "-1"], "--warmup_steps: Got warmup_steps = -1.0"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    (["--attn_implementation", "nosuch"], "--attn_implementation nosuch: Specified"),
    (["--variant", "huge"], "--variant huge: Unknown DeiT variant 'huge'; choose one of"),
    (["--image_mean", "0.5,0.5"], "--image_mean takes 3 numbers, one per RGB channel"),
    (["--image_std", "0.2,0,0.2"], "--image_std values divide the pixels, so each must be > 0"),
    (["--config_overrides", "hiddn_size=16"], "unknown config field 'hiddn_size' of DeiTDistillConfig; did you mean hidden_size?"),
    (["--config_overrides", "hidden_size=16,num_attention_heads=3"], "must be divisible by num_attention_heads (3)"),
    (["--config_overrides", "hidden_size=16;patch_size=8"], "Field 'hidden_size' expected int, got str"),
    (["--config_overrides", "patch_size=8,hidden_size=16,num_attention_heads=2", "--image_size", "20"], "--image_size 20"),
    (["--architecture", "resnet", "--config_overrides", "hiden_sizes=[8]"], "'hiden_sizes' of ResNetConfig; did you mean hidden_sizes?"),
    (["--architecture", "resnet", "--config_overrides", "hidden_sizes=[8,16,32],depths=[1,1]"], "hidden_sizes has 3 stages and depths 2"),
    (["--config_overrides", "hidden_size=30,num_attention_heads=4,patch_size=8"], "--config_overrides hidden_size=30,num_attention_heads=4,patch_size=8: DeiTDistillConfig.hidden_size (30) must be divisible"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "said"), OUT_OF_RANGE, ids=[case[0][0] for case in OUT_OF_RANGE])
def test_train_refuses_out_of_range_and_replaced_flags_before_writing(
    data, tmp_path, capsys, monkeypatch, flags, said
):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset_name", str(data), *TINY, *SCRATCH, *NO_TEACHER, *flags]
    expect_refusal(capsys, tmp_path, [*argv, "--output_dir", str(tmp_path / "out")], said)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["eval", "{model}", "--batch_size", "0"], "--batch_size must be >= 1"),
        (
            ["eval", "{model}", "--unlabeled_dataset", "x"],
            "--unlabeled_dataset only adds unlabelled training",
        ),
        (["predict", "{model}", "x.png", "--top_k", "0"], "--top_k must be >= 1"),
        (["predict", "{model}", "{empty}"], "{empty} holds no image files"),
        (
            ["predict", "{model}", "x.png", "--onnx_file", "m.onnx"],
            "--onnx_file m.onnx is read only with --onnx",
        ),
        (["export", "{model}", "--output", "{file}"], "is a file, not a folder"),
        (["train", "--output_dir", "{file}", *SCRATCH, *NO_TEACHER, *TINY], "is a file, not a folder"),
        (
            ["cache-teacher", "--teacher", "{model}", "--teacher_cache", "{file}", *TINY],
            "is a file, not a folder",
        ),
        (
            ["cache-teacher", "--teacher", "{model}", "--teacher_cache", "{file}/cache", *TINY],
            "is under {file}, which is a file, not a folder",
        ),
        (
            [
                "cache-teacher",
                "--teacher",
                "{model}",
                "--teacher_cache",
                "c",
                "--output_dir",
                "{file}",
                *TINY,
            ],
            "--output_dir {file} is a file, not a folder",
        ),
        (
            ["train", "--output_dir", "{file}/run", *SCRATCH, *NO_TEACHER, *TINY],
            "is under {file}, which is a file",
        ),
    ],
)
def test_other_commands_refuse_bad_values_before_writing(model, tmp_path, capsys, monkeypatch, argv, said):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("mine")

    (tmp_path / "empty").mkdir()

    def fill(text: str) -> str:
        names = {"{model}": model, "{file}": tmp_path / "a_file", "{empty}": tmp_path / "empty"}
        for name, path in names.items():
            text = text.replace(name, str(path))
        return text

    expect_refusal(capsys, tmp_path, [fill(arg) for arg in argv], fill(said))


@pytest.mark.parametrize(
    ("flags", "warned"),
    [
        (["--distillation_type", "none", "--teacher", "t/t"], "--teacher (no teacher with --distillation_type none)"),
        (["--distillation_type", "none", "--alpha", "0.9"], "--alpha (no teacher"),
        (["--distillation_type", "hard", "--teacher", "t/t", "--tau", "3"], "--tau (soft distillation only"),
        (["--distillation_type", "hard", "--teacher", "t/t", "--kl_reduction", "batchmean"], "--kl_reduction (soft"),
        ([*NO_TEACHER, "--mixup", "0", "--cutmix", "0", "--mixup_prob", "0.5"], "--mixup_prob (Mixup and CutMix are off"),
        ([*NO_TEACHER, "--cutmix", "0", "--mixup_switch_prob", "0.2"], "--mixup_switch_prob (it chooses"),
        ([*NO_TEACHER, "--cache_top_k", "3"], "--cache_top_k (cache-teacher only"),
        ([*NO_TEACHER, "--cache_cycle", "true"], "--cache_cycle (it replays a --teacher_cache"),
        ([*NO_TEACHER, "--model_name_or_path", "m/m", "--variant", "small"], "--variant (a checkpoint keeps"),
        ([*NO_TEACHER, "--hub_model_id", "me/run"], "--hub_model_id (nothing is pushed"),
    ],
)  # fmt: skip
def test_a_setting_that_would_do_nothing_is_warned_about(tmp_path, caplog, flags, warned):
    model_args, _, augmentation, distill, run, training, cache = parse_args(
        [*flags, "--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--report_to", "none"]
    )
    with caplog.at_level(logging.WARNING):
        unused = check_settings_take_effect(model_args, augmentation, distill, run, training, cache)
    assert [setting for setting in unused if setting.startswith(warned.split(" (")[0])] == [
        next(setting for setting in unused if warned in setting)
    ]
    assert f"{next(setting for setting in unused if warned in setting)} has no effect" in caplog.text


def test_default_settings_warn_about_nothing(tmp_path):
    groups = parse_args(["--output_dir", str(tmp_path / "o"), "--use_cpu", "true", *NO_TEACHER])
    model_args, _, augmentation, distill, run, training, cache = groups
    assert check_settings_take_effect(model_args, augmentation, distill, run, training, cache) == []


def test_train_help_is_grouped_and_short_and_help_all_has_everything(capsys):
    assert cli(["train", "--help"]) == 0
    short = capsys.readouterr().out
    assert cli(["train", "--help_all"]) == 0
    full = capsys.readouterr().out
    titles = ["Model:", "Data:", "Augmentation:", "Distillation:", "Teacher cache:", "Run:", "Training ("]
    positions = [short.index(title) for title in titles]
    assert positions == sorted(positions)
    assert "--label_smoothing_factor" not in short and "--label_smoothing_factor" in full
    assert "--debug" not in short and "TPU" not in short and "--neftune_noise_alpha" not in short
    assert len(short.splitlines()) < len(full.splitlines()) / 4
    # Every project flag has a help line.
    for line in short.split("Training (")[0].splitlines():
        if line.startswith("  --"):
            assert len(line.split(maxsplit=1)) == 2, line


# ------------------------------------------------------------------------------------- owning the output dir
def _lock(folder: Path, host: str, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"host": host, "pid": pid, "started": "earlier", "command": "deit-distill train"}
    (folder / LOCK_FILE).write_text(json.dumps(holder))


def test_a_folder_held_by_a_live_run_is_refused_and_left_alone(data, tmp_path, capsys):
    out = tmp_path / "out"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as holder:
        try:
            _lock(out, socket.gethostname(), holder.pid)
            argv = [
                "train",
                "--dataset_name",
                str(data),
                *TINY,
                *SCRATCH,
                *NO_TEACHER,
                "--output_dir",
                str(out),
            ]
            line = expect_refusal(
                capsys, tmp_path, argv, f"--output_dir {out} is in use by deit-distill train"
            )
            assert f"pid {holder.pid}" in line
        finally:
            holder.kill()


def test_overwrite_output_dir_keeps_the_previous_run_when_the_new_one_cannot_start(
    data, model, tmp_path, capsys
):
    # --overwrite_output_dir removes the old run only once the new one's data and model load: a mistake in the
    # new command (here a single-class folder) must not cost the user the run they meant to replace.
    previous = tmp_path / "previous"
    shutil.copytree(model, previous)
    one_class = tmp_path / "one_class"
    shutil.copytree(data / "circle", one_class / "circle")
    argv = ["train", "--dataset_name", str(one_class), *TINY, *SCRATCH, *NO_TEACHER]
    argv += ["--output_dir", str(previous), "--overwrite_output_dir", "true"]
    expect_refusal(capsys, tmp_path, argv, "class", status=2)
    assert (previous / "model.safetensors").is_file()


def test_cache_teacher_holds_its_cache_folder_too(data, model, tmp_path, capsys):
    cache = tmp_path / "cache"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as holder:
        try:
            _lock(cache, socket.gethostname(), holder.pid)
            argv = ["cache-teacher", "--dataset_name", str(data), *TINY, *SCRATCH, "--teacher", str(model)]
            argv += ["--teacher_cache", str(cache), "--output_dir", str(tmp_path / "unused")]
            expect_refusal(capsys, tmp_path, argv, f"--teacher_cache {cache} is in use by deit-distill train")
        finally:
            holder.kill()


def test_a_lock_from_another_host_says_how_to_remove_it(data, tmp_path, capsys):
    out = tmp_path / "out"
    _lock(out, "elsewhere.example", 1)
    argv = ["train", "--dataset_name", str(data), *TINY, *SCRATCH, *NO_TEACHER, "--output_dir", str(out)]
    expect_refusal(capsys, tmp_path, argv, "on elsewhere.example", f"remove {out / LOCK_FILE}")


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(data, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    _lock(out, socket.gethostname(), dead.pid)
    argv = ["train", "--dataset_name", str(data), *TINY, *SCRATCH, *NO_TEACHER, "--output_dir", str(out)]
    with caplog.at_level(logging.WARNING):
        assert cli(argv) == 0
    assert f"taking over the lock of deit-distill train (pid {dead.pid}" in caplog.text
    assert (out / RUN_RECORD_FILE).is_file() and not (out / LOCK_FILE).exists()


def test_a_run_records_absolute_paths_and_eval_works_from_anywhere(
    data, model, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(data.parent)
    teacher = os.path.relpath(model, data.parent)
    argv = ["train", "--dataset_name", data.name, *TINY, *SCRATCH, "--teacher", teacher]
    assert cli([*argv, "--output_dir", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    record = RunRecord.read(tmp_path / "run")
    assert record.distillation["teacher"] == str(model.resolve())
    assert record.data["dataset_name"] == str(data.resolve())
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    # The final evaluation is printed from the metrics that went to eval_results.json.
    avg_row = next(line for line in printed.splitlines() if line.startswith("  avg "))
    assert avg_row.split()[1:] == [f"{100 * results[f'eval_avg_top{k}']:.2f}" for k in (1, 5)]
    assert f"eval loss {results['eval_loss']:.4f}" in printed
    assert f"student-teacher agreement {100 * results['eval_agreement']:.2f}" in printed
    monkeypatch.chdir(tmp_path)
    assert cli(["eval", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["eval_avg_top1"] == results["eval_avg_top1"]


@pytest.mark.parametrize("length", [["--max_steps", "2"], ["--max_steps", "-1", "--num_train_epochs", "1"]])
def test_resuming_a_run_that_reached_its_length_is_refused_and_changes_nothing(
    data, tmp_path, capsys, length
):
    """It would train nothing, yet rewrite the run's model, metrics and card."""
    out = tmp_path / "out"
    # 10 training images (12, less the held-out 10%) at batch 4: 3 steps make one epoch.
    first = ["train", "--dataset_name", str(data), *TINY, *SCRATCH, *NO_TEACHER, "--max_steps", "3",
             "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out)]  # fmt: skip
    assert cli(first) == 0
    capsys.readouterr()
    again = [*first, "--resume_from_checkpoint", "true", *length]
    said = f"--resume_from_checkpoint: {out}/checkpoint-3 is at step 3 (epoch 1)"
    expect_refusal(
        capsys, tmp_path, again, said, "nothing is left to train", f"Raise {length[-2]} to train further"
    )


@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir", "true"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize(
    "files", [["holiday.jpg", "notes/"], ["config.json", "model.safetensors"]], ids=["photos", "a model"]
)
def test_a_folder_that_is_not_a_run_is_never_trained_into_or_cleared(
    data, tmp_path, capsys, files, overwrite
):
    """A user's folder (photos, a plain saved model) given as --output_dir: a run's README.md and config.json would
    land among its files, and --overwrite_output_dir would delete them all."""
    folder = tmp_path / "mine"
    for name in files:
        path = folder / name.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if name.endswith("/") else path.write_text("mine")
    argv = [
        "train",
        "--dataset_name",
        str(data),
        *TINY,
        *SCRATCH,
        *NO_TEACHER,
        "--output_dir",
        str(folder),
        *overwrite,
    ]
    expect_refusal(
        capsys, tmp_path, argv, f"--output_dir {folder} holds files that are not a deit-distill run"
    )


def test_overwriting_a_run_keeps_the_folders_hidden_entries(data, tmp_path, capsys):
    """A run folder cloned from its Hub repo holds a .git: replacing the run must not delete it."""
    out = tmp_path / "run"
    argv = ["train", "--dataset_name", str(data), *TINY, *SCRATCH, *NO_TEACHER, "--output_dir", str(out)]
    assert cli(argv) == 0
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (out / "old_notes.txt").write_text("from the previous run")
    assert cli([*argv, "--overwrite_output_dir", "true"]) == 0
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main"
    assert not (out / "old_notes.txt").exists() and (out / "model.safetensors").is_file()


# -------------------------------------------------------------------------------------------- interruptions
def test_ctrl_c_in_train_is_one_line_exit_130_and_releases_the_folder(data, tmp_path, capsys, monkeypatch):
    from deit_distill.training.trainer import DistillationTrainer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DistillationTrainer, "train", interrupted)
    out = tmp_path / "out"
    argv = ["train", "--dataset_name", str(data), *TINY, *SCRATCH, *NO_TEACHER, "--output_dir", str(out)]
    assert cli(argv) == 130
    line = one_error_line(capsys, "deit-distill train: interrupted; ")
    assert "no checkpoint was saved" in line
    assert not (out / LOCK_FILE).exists()


def test_ctrl_c_in_cache_teacher_names_the_incomplete_cache_and_releases_it(
    data, model, tmp_path, capsys, monkeypatch
):
    from deit_distill.training.commands import cache_teacher

    def interrupted(trainer, directory, *args, **kwargs):
        (Path(directory) / "shard.parquet").write_text("half")  # what a cut run leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_teacher, "write_teacher_cache", interrupted)
    cache = tmp_path / "cache"
    argv = [
        "cache-teacher",
        "--dataset_name",
        str(data),
        *TINY,
        "--teacher",
        str(model),
        "--teacher_cache",
        str(cache),
    ]
    assert cli([*argv, "--output_dir", str(tmp_path / "out")]) == 130
    line = one_error_line(capsys, "deit-distill cache-teacher: interrupted; ")
    assert f"the teacher cache {cache} is incomplete" in line and "run the same command again" in line
    assert not (cache / LOCK_FILE).exists()


def test_ctrl_c_in_push_is_one_line_exit_130_and_changes_nothing(model, capsys, monkeypatch):
    import deit_distill.model_cards as model_cards

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_cards, "push_run", interrupted)
    before = snapshot(model)
    assert cli(["push", str(model), "--repo_id", "me/tiny"]) == 130
    line = one_error_line(capsys, "deit-distill push: interrupted; ")
    assert "me/tiny did not finish and no partial commit was made" in line
    assert snapshot(model) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_signal, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_a_second_live_run_is_refused_and_a_real_signal_ends_the_first_cleanly(
    data, tmp_path, capsys, stop_signal, status
):
    """Two processes on one folder: the second is refused naming the first, which goes on untouched; SIGINT (Ctrl-C)
    or SIGTERM (a scheduler's preemption) then ends the first with one line naming its checkpoint, exit 130 or 143,
    and its lock released, so that the same command can resume it (on any host)."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        [str(Path(sys.executable).with_name("deit-distill")), "train", "--dataset_name", str(data), *SCRATCH,
         *NO_TEACHER, "--image_size", "16", "--per_device_train_batch_size", "4", "--use_cpu", "true",
         "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "100000", "--save_steps", "1",
         "--save_total_limit", "1", "--output_dir", str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test run started in the background by a non-interactive shell (as CI may be) inherits SIGINT ignored,
        # and Python keeps an ignored SIGINT ignored (as `nohup` wants): give the child the terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoint-*/trainer_state.json")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        argv = ["train", "--dataset_name", str(data), *TINY, *SCRATCH, *NO_TEACHER, "--output_dir", str(out)]
        assert cli(argv) == 2
        assert f"is in use by deit-distill train (pid {first.pid}" in one_error_line(capsys)
        assert first.poll() is None  # the first run goes on
        first.send_signal(stop_signal)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == status, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"deit-distill train: interrupted; checkpoint at {out}/checkpoint-"), last
    assert Path(last.split("checkpoint at ")[1].split(":")[0]).is_dir()
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_under_two_processes_a_held_folder_stops_every_process_in_one_line(data, tmp_path):
    """Only the main process takes the lock; the other learns that it failed and stops too, instead of training."""
    from test_distributed import free_port

    out = tmp_path / "out"
    root = Path(__file__).resolve().parent.parent
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as holder:
        try:
            _lock(out, socket.gethostname(), holder.pid)
            before = snapshot(tmp_path)
            command = [
                sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(root / "training" / "accelerate_configs" / "cpu_ddp.yaml"),
                "--main_process_port", str(free_port()),
                str(root / "training" / "train.py"),
                "--dataset_name", str(data), *TINY, *SCRATCH, *NO_TEACHER, "--output_dir", str(out),
            ]  # fmt: skip
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=180,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
        finally:
            holder.kill()
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines() if line.startswith("deit-distill: error: ")]
    assert len(refusals) == 2, done.stderr[-4000:]  # one line from each process
    assert all(f"is in use by deit-distill train (pid {holder.pid}" in line for line in refusals)
    # accelerate's launcher prints its own traceback when a process fails; none comes from the project's code.
    assert not any(name in done.stderr for name in ("folder_lock.py", "commands/train.py", "FolderBusyError"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_a_missing_run_folder_is_said_to_be_missing(tmp_path, capsys, monkeypatch, command):
    # `runs/nothere` also reads as a Hub id (owner/name), so the message must still say the folder is not here.
    monkeypatch.chdir(tmp_path)
    expect_refusal(capsys, tmp_path, [command, "runs/nothere"], "runs/nothere: no such folder here")


def test_on_a_terminal_the_error_line_clears_a_progress_bar_left_on_the_line(tmp_path):
    """A tqdm bar leaves the cursor at the end of its line: the one line must start on a cleared line, not after it."""
    import fcntl
    import pty
    import struct
    import termios

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(
        child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0)
    )  # a new pty is 0 columns wide
    script = (
        "import sys, tqdm\n"
        "bar = tqdm.tqdm(total=10, file=sys.stderr, mininterval=0); bar.update(3)\n"
        "from deit_distill.training.commands.cli import main\n"
        f"sys.exit(main(['eval', {str(tmp_path / 'nothere')!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], stderr=child_fd, stdout=subprocess.PIPE, timeout=120
    )
    os.close(child_fd)
    screen = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(main_fd)
    assert done.returncode == 2
    bar_line, _, after = screen.decode().partition("\r\x1b[K")
    assert "3/10" in bar_line  # the bar was drawn, and the message came after a cleared line
    assert after.startswith("deit-distill: error: eval: ") and "nothere" in after.splitlines()[0], screen


def test_ctrl_c_while_a_command_is_still_loading_is_one_line_exit_130(data, tmp_path):
    """The console script imports each command's modules (torch, transformers, datasets: seconds) inside its
    handler, so a Ctrl-C that early is one line and exit 130 too, not a traceback and death by the signal."""
    command = [str(Path(sys.executable).with_name("deit-distill")), "train", "--dataset_name", str(data), *TINY,
               *SCRATCH, *NO_TEACHER, "--output_dir", str(tmp_path / "out")]  # fmt: skip
    process = subprocess.Popen(
        command,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal (see above)
    )
    time.sleep(0.5)  # Python is up; the command's imports take seconds
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("deit-distill"), err[-500:]
    assert "interrupted" in err.strip().splitlines()[-1]


def test_an_error_of_several_lines_is_printed_as_one(capsys, monkeypatch):
    """Some messages passed on from a library (or listing several fields) have several lines: still one line."""
    from deit_distill.training.commands import views

    def refuse(argv):
        raise UserError("a cache of other views. Differing fields:\n  seed: 0 vs 1\n  epochs: 2 vs 3")

    monkeypatch.setattr(views, "main", refuse)
    assert cli(["views", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        err == "deit-distill: error: a cache of other views. Differing fields: seed: 0 vs 1 epochs: 2 vs 3\n"
    )


def test_piped_help_and_a_training_flag_given_to_eval(model, capsys):
    """`deit-distill --help | head -1` ends quietly (a reader that leaves is no error); eval takes no --lr."""
    exe = Path(sys.executable).with_name("deit-distill")
    # `true` leaves before Python has started, so the help's write always meets a closed pipe.
    for command in (f"{exe} --help | true", f"{exe} eval --help | true", f"{exe} train --help | head -1"):
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and done.stderr == "", (command, done.stderr[-2000:])
    assert cli(["eval", str(model), "--lr", "3"]) == 2
    assert one_error_line(capsys).endswith(
        "unknown flag --lr: this command takes no --learning_rate; see --help for its flags."
    )


def test_predict_with_weights_that_give_nan_reports_each_image_as_failed(model, data, tmp_path, capsys):
    """Bits damaged inside model.safetensors (header and size intact) pass every file check; the NaN scores they
    give are reported per image (exit 1), not printed as predictions."""
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    weights = load_file(damaged / "model.safetensors")
    name = next(key for key in weights if key.endswith("classifier.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    image = data / "circle" / "0.png"
    assert cli(["predict", str(damaged), str(image)]) == 1
    err = capsys.readouterr().err
    assert f"{image}: error: cannot classify: ValueError: the model's scores are NaN" in err
