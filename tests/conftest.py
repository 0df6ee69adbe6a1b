"""Shared fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_server import HubServer  # tests/ is on sys.path (pytest puts a conftest's folder there)

# ------------------------------------------------------------------------------------------------------------------
# Hub sharing: a local Hub-compatible server, clients in fresh interpreters, and saved training runs.
#
# huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, and the test session may have imported it
# already, so every Hub client runs in a subprocess whose environment points at the server.

LABELS = ["cat", "dog", "fox"]


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture
def hub(hub_server: HubServer) -> Iterator[HubServer]:
    """The session's server, with no fault left over from another test."""
    hub_server.clear_faults()
    yield hub_server
    hub_server.clear_faults()


@pytest.fixture(scope="session")
def hub_client(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """`run(script, params=None, token=None, clean=False, cwd=None, env=None)`: run `script` in a fresh interpreter
    that talks to the test Hub and return the JSON it prints on its last stdout line. `params` is visible there
    as `PARAMS`.

    The environment has HF_ENDPOINT set, offline mode off and a new HF_HOME (no cache, no stored token), plus
    HF_TOKEN when `token` is given and any `env` override. `clean=True` also hides this project (the editable
    install's .pth finder and PYTHONPATH), so the script sees what a user of a pushed repo has: the libraries.
    """

    def run(
        script: str,
        params: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        clean: bool = False,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Any:
        home = tmp_path_factory.mktemp("client")
        variables = {
            k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
        }
        variables.update(
            HF_ENDPOINT=hub_server.url,
            HF_HOME=str(home / "hf_home"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            **({"HF_TOKEN": token} if token else {}),
        )
        variables.update(env or {})
        code = f"PARAMS = {params or {}!r}\n" + textwrap.dedent(script)
        command = [sys.executable, "-c", code]
        if clean:
            # -I -S: no PYTHON* variables, no cwd on sys.path, no .pth files (so no editable finder); then the
            # installed libraries only.
            prelude = f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
            command = [sys.executable, "-I", "-S", "-c", prelude + code]
        done = subprocess.run(
            command, env=variables, cwd=cwd or home, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise AssertionError(f"client script failed ({done.returncode}):\n{done.stderr[-6000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeiTDistill model saved with its code and image processor, as training saves it."""
    import torch

    from deit_distill.modeling_deit_distill import (
        DeiTDistillConfig,
        DeiTDistillForImageClassification,
        attach_pipeline,
        build_image_processor,
    )

    config = DeiTDistillConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_model")
    DeiTDistillForImageClassification(config).save_pretrained(path)
    build_image_processor(config, crop_pct=1.0).save_pretrained(path)
    attach_pipeline(path)
    return path


# A real tiny run: 64 Fashion-MNIST images, 2 steps, a one-block student (warmup given as a ratio, as a recipe may).
TINY_RUN = [
    "--max_train_samples", "64",
    "--max_eval_samples", "32",
    "--image_size", "28",
    "--crop_pct", "1.0",
    "--augmentation", "none",
    "--mixup", "0",
    "--cutmix", "0",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "32",
    "--max_steps", "2",
    "--logging_steps", "1",
    "--warmup_steps", "0.1",
    "--use_cpu", "true",
    "--report_to", "none",
    "--save_strategy", "no",
    "--disable_tqdm", "true",
]  # fmt: skip
TINY_TEACHER = [
    "--architecture",
    "resnet",
    "--config_overrides",
    "embedding_size=8,hidden_sizes=[8,16],depths=[1,1]",
]
TINY_STUDENT = [
    "--config_overrides", "patch_size=7,hidden_size=24,num_hidden_layers=1,num_attention_heads=2",
    "--drop_path_rate", "0",
]  # fmt: skip
CARD_TEACHER_ID, CARD_BASE_MODEL = "test-user/resnet-teacher", "facebook/deit-tiny-patch16-224"


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories written by `train` itself, a few seconds in all: `teacher` (a convnet, no distillation),
    `student` (hard distillation from the local teacher), `cache` (the teacher's outputs, `cache-teacher`) and
    `cached` (soft distillation from the cache, with `--card_teacher_id` and `--card_base_model`)."""
    from deit_distill.training.commands.cache_teacher import main as cache_teacher
    from deit_distill.training.commands.train import main as train

    root = tmp_path_factory.mktemp("trained_runs")
    runs = {name: root / name for name in ("teacher", "student", "cache", "cached")}
    train([*TINY_TEACHER, *TINY_RUN, "--distillation_type", "none", "--output_dir", str(runs["teacher"])])
    teacher = ["--teacher", str(runs["teacher"])]
    train(
        [
            *TINY_STUDENT,
            *TINY_RUN,
            *teacher,
            "--distillation_type",
            "hard",
            "--output_dir",
            str(runs["student"]),
        ]
    )
    soft = [*TINY_STUDENT, *TINY_RUN, "--distillation_type", "soft"]
    cache_teacher([*soft, *teacher, "--teacher_cache", str(runs["cache"])])
    train(
        [
            *soft,
            "--teacher_cache", str(runs["cache"]),
            "--output_dir", str(runs["cached"]),
            "--card_teacher_id", CARD_TEACHER_ID,
            "--card_base_model", CARD_BASE_MODEL,
        ]
    )  # fmt: skip
    return runs


_KEEP: Any = object()


@pytest.fixture(scope="session")
def make_run(trained_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_run(name, source="student", metrics=..., log_history=..., info=...)`: a copy of a real run
    (`trained_runs[source]`) with what training leaves beside the model (arguments, a checkpoint). By default
    every file is the run's own; a dict replaces `eval_results.json` / the log / `deit_distill_run.json`, None
    removes it."""

    def make(
        name: str = "run",
        *,
        source: str = "student",
        info: dict | None = _KEEP,
        metrics: dict | None = _KEEP,
        log_history: list | None = _KEEP,
    ) -> Path:
        run = Path(shutil.copytree(trained_runs[source], tmp_path_factory.mktemp("runs") / name))
        state_file = run / "trainer_state.json"
        state = json.loads(state_file.read_text())
        files = {
            "deit_distill_run.json": info,
            "eval_results.json": metrics,
            "trainer_state.json": log_history
            if log_history in (None, _KEEP)
            else {**state, "log_history": log_history},
        }
        for file, content in files.items():
            if content is None:
                (run / file).unlink()
            elif content is not _KEEP:
                (run / file).write_text(json.dumps(content, indent=2))
        (run / "checkpoint-10").mkdir()
        (run / "checkpoint-10" / "optimizer.pt").write_bytes(b"optimizer state")
        return run

    return make
