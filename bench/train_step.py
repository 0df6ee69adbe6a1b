"""Training-step throughput of the demo student, alone and distilled from a small convnet teacher, and the
overhead of `DistillationTrainer` over a plain PyTorch loop doing the same work.

    python bench/train_step.py --threads 1 --clock cpu --repeats 7

Models: the demo student (DeiTDistill, image 28, patch 7, width 96, depth 4, 3 heads, drop-path 0.1) and a
transformers ResNet teacher (embedding 24, hidden sizes 32/64/128, depths 1/1/1, basic blocks, no downsampling
in the first stage), on 10 classes.

Both loops get the same pre-made batches (random tensors, so data loading costs nothing in either), the same
model, the same `DistillationLoss` (label smoothing 0.1; "none" or "hard"), the same optimizer class and
arguments (the Trainer's own `get_optimizer_cls_and_kwargs`, with its decay / no-decay groups), a cosine
schedule and no gradient clipping (the DeiT recipe). The Trainer also runs its data loader, callbacks,
loss bookkeeping and one log at the end; that is the overhead measured. The time of a step runs from the end of
one optimizer step to the end of the next, after warm-up steps. The modes take turns inside every repeat
(rotating who goes first) and the median repeat is reported.

`--profile` prints where a DistillationTrainer step spends its time beyond the plain loop (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import transformers
from torch.utils.data import Dataset
from transformers import (
    PrinterCallback,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_scheduler,
)

from deit_distill.modeling_deit_distill import DeiTDistillConfig, DeiTDistillForImageClassification
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.optim import no_decay_parameter_names
from deit_distill.training.trainer import DistillationTrainer

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
NUM_CLASSES = 10
LEARNING_RATE, WEIGHT_DECAY = 5e-4, 0.05


def build_student() -> DeiTDistillForImageClassification:
    torch.manual_seed(0)
    config = DeiTDistillConfig(
        image_size=28,
        patch_size=7,
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=3,
        drop_path_rate=0.1,
        num_labels=NUM_CLASSES,
    )
    return DeiTDistillForImageClassification(config)


def build_teacher() -> ResNetForImageClassification:
    torch.manual_seed(1)
    config = ResNetConfig(
        embedding_size=24,
        hidden_sizes=[32, 64, 128],
        depths=[1, 1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=NUM_CLASSES,
    )
    return ResNetForImageClassification(config).eval().requires_grad_(False)


class PremadeBatches(Dataset):
    """Each item is a whole batch; with `per_device_train_batch_size=1` and `first_item` the Trainer gets it as is."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]


def first_item(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return dict(items[0])


class StepClock(TrainerCallback):
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(self.clock())


def training_args(output_dir: str, num_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=num_steps,  # one log, at the end
        max_steps=num_steps,
        per_device_train_batch_size=1,  # one pre-made batch per step
        dataloader_num_workers=0,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="cosine",
        max_grad_norm=0.0,
        optim="adamw_torch",
        disable_tqdm=True,
        seed=0,
    )


def plain_loop(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    loss_fn: DistillationLoss,
    batches: list[dict[str, torch.Tensor]],
    args: TrainingArguments,
    clock: Callable[[], float],
) -> list[float]:
    """What the Trainer does per step, written out: forward, teacher, loss, backward, AdamW, schedule."""
    no_decay = no_decay_parameter_names(student)
    groups = [
        {
            "params": [p for n, p in student.named_parameters() if n not in no_decay],
            "weight_decay": WEIGHT_DECAY,
        },
        {"params": [p for n, p in student.named_parameters() if n in no_decay], "weight_decay": 0.0},
    ]
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, student)
    optimizer = optimizer_cls(groups, **optimizer_kwargs)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    student.train()
    stamps = []
    for batch in batches:
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        outputs = student(pixel_values=pixel_values)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(pixel_values).logits
        loss_fn(outputs, labels, teacher_logits).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(clock())
    return stamps


def trainer_loop(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    loss_fn: DistillationLoss,
    batches: list[dict[str, torch.Tensor]],
    args: TrainingArguments,
    clock: Callable[[], float],
) -> list[float]:
    step_clock = StepClock(clock)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        teacher=teacher,
        distillation_loss=loss_fn,
        data_collator=first_item,
        train_dataset=PremadeBatches(batches),
        callbacks=[step_clock],
    )
    trainer.remove_callback(PrinterCallback)  # prints the one log line; not part of a step
    trainer.train()
    return step_clock.stamps


def teacher_only(teacher, batches, clock) -> list[float]:
    stamps = []
    for batch in batches:
        with torch.no_grad():
            teacher(batch["pixel_values"])
        stamps.append(clock())
    return stamps


def seconds_per_step(stamps: list[float], warmup: int) -> float:
    timed = stamps[warmup - 1 :]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def profile_trainer(student, teacher, batches, args) -> None:
    """cProfile of plain vs Trainer distillation steps: the functions where the Trainer spends extra time."""
    loss_fn = DistillationLoss("hard", label_smoothing=0.1)
    for name, loop in (("plain loop", plain_loop), ("DistillationTrainer", trainer_loop)):
        profiler = cProfile.Profile()
        profiler.enable()
        loop(student, teacher, loss_fn, batches, args, time.perf_counter)
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(30)
        print(f"\n### {name}: {len(batches)} steps, by cumulative time\n{stream.getvalue()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per mode per repeat.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps before them.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed repeats (median reported).")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads.")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="'cpu' needs --threads 1.")
    parser.add_argument(
        "--profile", action="store_true", help="Profile one plain and one Trainer run instead."
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (several threads' CPU time includes spin-waiting)")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    clock = CLOCKS[args.clock]

    student, teacher = build_student(), build_teacher()
    num_steps = args.warmup + args.steps
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "pixel_values": torch.randn(args.batch_size, 3, 28, 28, generator=generator),
            "labels": torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=generator),
        }
        for _ in range(num_steps)
    ]
    output_dir = tempfile.mkdtemp(prefix="bench_train_step_")
    step_args = training_args(output_dir, num_steps)
    if args.profile:
        profile_trainer(student, teacher, batches, step_args)
        return

    none, hard = DistillationLoss("none", label_smoothing=0.1), DistillationLoss("hard", label_smoothing=0.1)
    modes: dict[str, Callable[[], list[float]]] = {
        "plain, student only": lambda: plain_loop(student, None, none, batches, step_args, clock),
        "Trainer, student only": lambda: trainer_loop(student, None, none, batches, step_args, clock),
        "plain, distillation": lambda: plain_loop(student, teacher, hard, batches, step_args, clock),
        "Trainer, distillation": lambda: trainer_loop(student, teacher, hard, batches, step_args, clock),
        "teacher forward only": lambda: teacher_only(teacher, batches, clock),
    }
    for run in modes.values():  # warm-up: allocator, kernels, first-call costs
        run()
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            seconds[name].append(seconds_per_step(modes[name](), args.warmup))
    median = {name: statistics.median(values) for name, values in seconds.items()}

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} threads, {args.clock} clock, "
        f"batch {args.batch_size}, {args.steps} timed steps x {args.repeats} repeats (median)\n"
    )
    print("| loop | loss | ms / step | steps / s | images / s | Trainer overhead |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, loss in (("student only", "none"), ("distillation", "hard")):
        plain, trainer = median[f"plain, {kind}"], median[f"Trainer, {kind}"]
        for loop, value in (("plain PyTorch", plain), ("DistillationTrainer", trainer)):
            overhead = f"{100 * (trainer / plain - 1):+.1f}%" if loop == "DistillationTrainer" else ""
            print(
                f"| {loop} | {loss} | {1000 * value:.2f} | {1 / value:.1f} | {args.batch_size / value:.0f} | "
                f"{overhead} |"
            )
    teacher_time = median["teacher forward only"]
    print(f"| teacher forward (no_grad) | | {1000 * teacher_time:.2f} | {1 / teacher_time:.1f} | | |")
    plain_student, plain_distill = median["plain, student only"], median["plain, distillation"]
    print(
        f"\nTeacher's share of a distillation step: {100 * teacher_time / plain_distill:.0f}% (teacher forward / "
        f"plain distillation step); distillation step / student-only step: {plain_distill / plain_student:.2f}x."
    )
    spread = {name: (min(v) / median[name], max(v) / median[name]) for name, v in seconds.items()}
    print(
        "Repeat spread (min/median, max/median): "
        + ", ".join(f"{name} {low:.2f}-{high:.2f}" for name, (low, high) in spread.items())
    )


if __name__ == "__main__":
    main()
