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

RUN_INFO = {
    "model": {
        "architecture": "DeiTDistillForImageClassification",
        "variant": "tiny",
        "num_parameters": 5717416,
        "started_from": "facebook/deit-tiny-distilled-patch16-224",
        "start_format": "transformers",
    },
    "data": {
        "dataset_name": "uoft-cs/cifar10",
        "dataset_config": "plain_text",
        "train_split": "train",
        "eval_split": "test",
        "eval_split_used": "test",
        "seed": 1234,
        "num_train_examples": 50000,
        "num_eval_examples": 10000,
        "augmentation": "deit",
        "mixup": 0.8,
        "cutmix": 1.0,
        "label_smoothing": 0.1,
    },
    "distillation": {
        "distillation_type": "hard",
        "alpha": 0.5,
        "tau": 1.0,
        "kl_reduction": "numel",
        "teacher": "edadaltocg/resnet18_cifar10",
    },
    "training": {
        "learning_rate": 0.0005,
        "per_device_train_batch_size": 128,
        "gradient_accumulation_steps": 2,
        "world_size": 2,
        "global_batch_size": 512,
        "epochs": 20.0,
        "steps": 1960,
        "weight_decay": 0.05,
        "warmup_ratio": 0.25,
        "lr_scheduler_type": "cosine",
        "optimizer": "adamw_torch",
        "seed": 1234,
        "mixed_precision": "bf16",
    },
    "card": {
        "base_model": "facebook/deit-tiny-distilled-patch16-224",
        "dataset_id": "uoft-cs/cifar10",
        "teacher_id": "edadaltocg/resnet18_cifar10",
    },
    "hardware": "2x NVIDIA H100 80GB",
    "license": "apache-2.0",
}
EVAL_RESULTS = {
    "eval_cls_top1": 0.6312,
    "eval_cls_top5": 0.9571,
    "eval_dist_top1": 0.6455,
    "eval_dist_top5": 0.9602,
    "eval_avg_top1": 0.6433,
    "eval_avg_top5": 0.9615,
    "eval_teacher_top1": 0.884,
    "eval_teacher_top5": 0.9952,
    "eval_agreement": 0.6721,
    "eval_loss": 1.0432,
}
LOG_HISTORY = [
    {
        "loss": 2.31,
        "learning_rate": 0.0001,
        "step": 10,
        "epoch": 0.5,
        "base_loss": 2.3,
        "distillation_loss": 2.32,
    },
    {
        "loss": 1.97,
        "learning_rate": 0.0005,
        "step": 20,
        "epoch": 1.0,
        "base_loss": 1.9,
        "distillation_loss": 2.04,
    },
    {
        "eval_loss": 1.8,
        "eval_avg_top1": 0.31,
        "eval_cls_top1": 0.3,
        "eval_dist_top1": 0.32,
        "step": 20,
        "epoch": 1.0,
    },
    {"train_runtime": 12.5, "train_loss": 2.1, "step": 20, "epoch": 1.0},
]
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


@pytest.fixture(scope="session")
def make_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_run(name, info=..., metrics=..., log_history=...)`: a run directory holding the tiny model, the run
    files (a value of None leaves that file out) and what training leaves beside them (a checkpoint, arguments)."""

    def make(
        name: str = "run",
        *,
        info: dict | None = RUN_INFO,
        metrics: dict | None = EVAL_RESULTS,
        log_history: list | None = LOG_HISTORY,
    ) -> Path:
        run = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("runs") / name)
        files = {
            "deit_distill_run.json": info,
            "eval_results.json": metrics,
            "trainer_state.json": None
            if log_history is None
            else {"log_history": log_history, "global_step": 20},
        }
        for file, content in files.items():
            if content is not None:
                (run / file).write_text(json.dumps(content, indent=2))
        (run / "training_args.bin").write_bytes(b"pickled TrainingArguments")
        (run / "checkpoint-10").mkdir()
        (run / "checkpoint-10" / "optimizer.pt").write_bytes(b"optimizer state")
        return run

    return make
