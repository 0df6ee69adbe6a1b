"""The `launchers` section of bench/gpu_check.py (issue 18): `deit-distill train` under each shipped launcher,
with a live teacher and from a teacher cache, killed mid-run and resumed, its losses against the DDP run's.

    python bench/gpu_check.py --sections launchers --out gpu_results        # on a CUDA machine
    python bench/gpu_check.py --smoke --sections launchers --out /tmp/smoke # the DDP rows on the CPU (plumbing)

Per launcher (`training/accelerate_configs/`: multi_gpu.yaml as DDP, fsdp.yaml as FSDP2, deepspeed_zero2.yaml;
one process each, `--num_processes 1`) and per mode (live teacher, teacher cache written once by `cache-teacher`
under DDP), a tiny student on the embedded Fashion-MNIST trains `STEPS` steps with a checkpoint every
`SAVE_STEPS`; the run is SIGKILLed inside step `KILL_AT` + 1 and resumed with `--resume_from_checkpoint true`.
Checks: the resumed run logs every step; its checkpoint folders have the layout the launcher writes
(`deit_distill.training.trainer.checkpoint_format`: plain, fsdp-full, deepspeed) and count as complete; its losses
match the uninterrupted DDP run's of the same mode (first loss within 2%, mean of the last 3 within 5%: FSDP2's
bf16 parameters and DeepSpeed's bf16 engine round differently from DDP's autocast); the cache records the
precision the teacher ran in (bf16). FSDP2 and DeepSpeed rows need CUDA (and `deepspeed` installed): on the CPU
they are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "training" / "accelerate_configs"
LAUNCHERS = {"ddp": "multi_gpu.yaml", "fsdp2": "fsdp.yaml", "deepspeed_zero2": "deepspeed_zero2.yaml"}
EXPECTED_FORMAT = {"ddp": "plain", "fsdp2": "fsdp-full", "deepspeed_zero2": "deepspeed"}
STEPS, SAVE_STEPS, KILL_AT = 8, 4, 4
FIRST_TOLERANCE, LAST_TOLERANCE = 0.02, 0.05

# train.py's `main`; with a marker path, it stalls inside step KILL_AT + 1 (after checkpoint-KILL_AT) for the kill.
WRAPPER = textwrap.dedent(
    """
    import sys, time
    from deit_distill.training.trainer import DistillationTrainer
    from deit_distill.training.commands.train import main
    marker, kill_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    step = DistillationTrainer.training_step
    def stall(self, *args, **kwargs):
        if marker != "none" and self.state.global_step == kill_at:
            open(marker, "w").write("stalled")
            time.sleep(600)
        return step(self, *args, **kwargs)
    DistillationTrainer.training_step = stall
    main(argv)
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_teacher(path: Path) -> None:
    from transformers import ResNetConfig, ResNetForImageClassification

    from deit_distill.modeling_deit_distill import build_image_processor
    from deit_distill.training.data import FASHION_MNIST_CLASSES

    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=len(FASHION_MNIST_CLASSES),
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={name: i for i, name in enumerate(FASHION_MNIST_CLASSES)},
    )
    config.image_size = 28
    ResNetForImageClassification(config).save_pretrained(path)
    build_image_processor(config, crop_pct=1.0).save_pretrained(path)


def run_args(work: Path, cuda: bool) -> list[str]:
    return [
        "--config_overrides", "patch_size=7,hidden_size=48,num_hidden_layers=2,num_attention_heads=3",
        "--drop_path_rate", "0", "--distillation_type", "soft",
        "--max_train_samples", "512", "--max_eval_samples", "64",
        "--image_size", "28", "--crop_pct", "1.0", "--augmentation", "deit", "--mixup", "0.8", "--cutmix", "1.0",
        "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
        "--dataloader_num_workers", "2", "--dataloader_drop_last", "true",
        "--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS),
        "--logging_steps", "1", "--learning_rate", "0.001", "--seed", "0",
        "--report_to", "none", "--disable_tqdm", "true",
        *(["--bf16", "true"] if cuda else ["--use_cpu", "true"]),
    ]  # fmt: skip


def launch(config: str, script: list[str], cuda: bool) -> list[str]:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
        "--num_processes", "1", "--main_process_port", str(free_port()),
    ]  # fmt: skip
    if not cuda:
        command += ["--cpu"]
    return [*command, *script]


def kill_tree(pid: int) -> None:
    """SIGKILL a launch and every process under it. `os.killpg` alone does not do: torchrun (under accelerate's
    DDP, FSDP and DeepSpeed launchers) starts each worker in a session of its own, which would live on, stalled."""
    import psutil  # accelerate's own dependency

    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    os.killpg(pid, signal.SIGKILL)
    for process in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def run(command: list[str], log_file: Path, marker: Path | None = None, timeout: float = 600) -> None:
    """Run `command`; with a marker, SIGKILL its process group once the marker appears."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if marker is not None and marker.exists():
                kill_tree(process.pid)
                process.wait()
                return
            if time.monotonic() > deadline:
                kill_tree(process.pid)
                raise RuntimeError(f"timed out: {' '.join(command)}; see {log_file}")
            time.sleep(0.5)
    if marker is not None:
        raise RuntimeError(f"finished before it could be killed (rc {process.returncode}); see {log_file}")
    if process.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"rc {process.returncode}: {' '.join(command[-4:])}\n{tail}")


def losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def compare(run: dict[int, float], reference: dict[int, float]) -> dict[str, Any]:
    steps = sorted(reference)
    first = abs(run[steps[0]] - reference[steps[0]]) / abs(reference[steps[0]])
    last = [step for step in steps[-3:]]
    mean_run = sum(run[s] for s in last) / len(last)
    mean_reference = sum(reference[s] for s in last) / len(last)
    final = abs(mean_run - mean_reference) / abs(mean_reference)
    return {
        "first_loss_gap": first,
        "last3_mean_gap": final,
        "max_step_gap": max(abs(run[s] - reference[s]) / abs(reference[s]) for s in steps),
        "passed": first <= FIRST_TOLERANCE and final <= LAST_TOLERANCE,
    }


def skip_reason(launcher: str, cuda: bool) -> str | None:
    if launcher != "ddp" and not cuda:
        return "needs a CUDA device (FSDP2 and DeepSpeed are not run on the CPU)"
    if launcher == "deepspeed_zero2" and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed)"
    return None


def launchers_section(
    device: torch.device, out: Path, names: list[str] | None = None, run_timeout: float = 600
) -> dict[str, Any]:
    """`names` picks the launchers and their order (all by default); `run_timeout` bounds each `accelerate launch`.
    A launcher that fails is recorded under `failed` and the next one still runs."""
    from deit_distill.training.teacher_cache import read_metadata
    from deit_distill.training.trainer import checkpoint_format, last_complete_checkpoint

    cuda = device.type == "cuda"
    work = out / "launchers"
    work.mkdir(parents=True, exist_ok=True)
    (work / "wrapper.py").write_text(WRAPPER)
    save_teacher(work / "teacher")
    base = run_args(work, cuda)
    live = ["--teacher", str(work / "teacher")]
    cache = ["--teacher_cache", str(work / "cache")]
    result: dict[str, Any] = {"rows": [], "skipped": {}, "failed": {}, "steps": STEPS, "kill_at": KILL_AT}

    def train(config: str, mode_args: list[str], output_dir: Path, kill: bool) -> None:
        marker = output_dir.parent / f"{output_dir.name}.stalled"
        # Not "-": accelerate's torchrun path (`_filter_args`) hands the script's arguments to argparse as one list,
        # and a list whose first item is "-" (or "") makes argparse fail with "unhashable type: 'list'".
        script = [str(work / "wrapper.py"), str(marker) if kill else "none", str(KILL_AT)]
        argv = [*base, *mode_args, "--output_dir", str(output_dir)]
        run(
            launch(config, [*script, *argv], cuda),
            output_dir.parent / f"{output_dir.name}.log",
            marker if kill else None,
            run_timeout,
        )

    # The cache, written once under DDP; its teacher precision is the run's.
    cache_command = launch(
        LAUNCHERS["ddp"], ["-m", "deit_distill.training.commands.cache_teacher", *base, *live, *cache,
                           "--output_dir", str(work / "cache-run")], cuda,
    )  # fmt: skip
    run(cache_command, work / "cache.log", timeout=run_timeout)
    result["cache_teacher_precision"] = read_metadata(work / "cache")["teacher"]["precision"]
    result["cache_precision_ok"] = result["cache_teacher_precision"] == ("bf16" if cuda else "fp32")

    references = {}
    for mode, mode_args in (("live teacher", live), ("teacher cache", cache)):
        reference_dir = work / f"reference-{mode.replace(' ', '-')}"
        train(LAUNCHERS["ddp"], mode_args, reference_dir, kill=False)
        references[mode] = losses(reference_dir)

    def launcher_rows(launcher: str) -> None:
        for mode, mode_args in (("live teacher", live), ("teacher cache", cache)):
            output_dir = work / f"{launcher}-{mode.replace(' ', '-')}"
            train(LAUNCHERS[launcher], mode_args, output_dir, kill=True)
            resumed_from = last_complete_checkpoint(output_dir)
            formats = {path.name: checkpoint_format(path) for path in sorted(output_dir.glob("checkpoint-*"))}
            train(
                LAUNCHERS[launcher], [*mode_args, "--resume_from_checkpoint", "true"], output_dir, kill=False
            )
            logged = losses(output_dir)
            row = {
                "launcher": launcher,
                "mode": mode,
                "resumed_from": Path(resumed_from).name if resumed_from else None,
                "checkpoint_formats_at_kill": formats,
                "formats_ok": bool(formats) and set(formats.values()) == {EXPECTED_FORMAT[launcher]},
                "steps_logged": sorted(logged) == list(range(1, STEPS + 1)),
                **compare(logged, references[mode]),
            }
            row["passed"] = row["passed"] and row["formats_ok"] and row["steps_logged"] and bool(resumed_from)
            result["rows"].append(row)
            print(f"  {json.dumps(row)}", flush=True)

    for launcher in names or list(LAUNCHERS):
        reason = skip_reason(launcher, cuda)
        if reason:
            result["skipped"][launcher] = reason
            print(f"  {launcher}: skipped, {reason}", flush=True)
            continue
        try:
            launcher_rows(launcher)
        except Exception as error:  # one launcher's failure must not hide the others' results
            result["failed"][launcher] = f"{type(error).__name__}: {error}"
            print(f"  {launcher}: FAILED, {error}", flush=True)
    result["passed"] = (
        result["cache_precision_ok"] and not result["failed"] and all(row["passed"] for row in result["rows"])
    )
    return result


def render(section: dict[str, Any]) -> list[str]:
    lines = [
        f"## Launchers: {section['steps']} steps, killed in step {section['kill_at'] + 1} and resumed, losses against "
        f"DDP ({'PASSED' if section.get('passed') else 'FAILED'}); cache teacher precision "
        f"{section.get('cache_teacher_precision')}",
        "",
        "| launcher | mode | resumed from | checkpoint layout | first-loss gap | last-3 gap | max step gap | result |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for row in section["rows"]:
        layouts = ", ".join(sorted({str(value) for value in row["checkpoint_formats_at_kill"].values()}))
        lines.append(
            f"| {row['launcher']} | {row['mode']} | {row['resumed_from']} | {layouts} | {row['first_loss_gap']:.2%} | "
            f"{row['last3_mean_gap']:.2%} | {row['max_step_gap']:.2%} | {'pass' if row['passed'] else 'FAIL'} |"
        )
    for launcher, reason in section["skipped"].items():
        lines.append(f"\n- {launcher}: skipped, {reason}")
    for launcher, error in section.get("failed", {}).items():
        lines.append(f"\n- {launcher}: FAILED, {error.strip().splitlines()[0]}")
    lines.append("")
    return lines
