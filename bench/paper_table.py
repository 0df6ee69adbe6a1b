"""The paper's distillation table at CPU scale, on the embedded Fashion-MNIST: one command regenerates docs/RESULTS.md.

    OMP_NUM_THREADS=1 python bench/paper_table.py            # the default budget (see TableConfig): 45 min measured
    python bench/paper_table.py --quick --output_dir /tmp/t  # seconds: tiny models, one seed (the test)

For every seed, two teachers are trained once on the student's images, a convnet (a transformers ResNet) and a
transformer (a plain ViT, wider and deeper than the student), sized so that both reach about the same accuracy.
Then, in both augmentation regimes (the paper's `deit` recipe and `light`), one fixed student size and budget
trains:

    none         plain ViT (no DIST token), labels only                    paper row 1
    soft_plain   plain ViT, soft distillation on its one head (tau 3, alpha 0.1, the paper's)  row 2
    hard_plain   plain ViT, hard distillation on its one head              row 3
    hard_token   CLS + DIST tokens, hard distillation: DIST head (row 4), average (row 5), CLS head
    soft_token   CLS + DIST tokens, soft distillation                      soft vs hard with the token
    hard_token_vit  as hard_token, with the transformer teacher            convnet vs transformer teacher

`--part unlabeled` measures what DeiT's data efficiency can do beyond the paper (see `UnlabeledConfig`): a
teacher trained on a few labelled images labels many unlabelled ones (`--unlabeled_dataset`), and a student
trained on both is compared with the same student on the labelled images alone and with its teacher. Each seed
is saved on its own (`unlabeled/seed<N>.json` under the output folder), so seeds can run in parallel processes;
the document gathers every seed found there. `--part all` runs both parts.

The convnet teacher's outputs come from a teacher cache (`cache-teacher`, once per seed and regime) that every
convnet-distilled student of that seed and regime replays; all students of a seed and regime draw exactly the
same augmented views. The transformer teacher teaches one run per seed and regime, where a cache would cost
more than it saves, so it runs live. CPU time is measured per run (`time.process_time`), so it does not depend on
what else the machine runs. Each distilled student with a DIST token is analysed (`deit_distill.training.analysis`: CLS/DIST
cosine by depth). The per-seed numbers go to `paper_table.json` next to the document; text below the
`<!-- notes -->` line of an existing document is kept, so hand-written notes survive a regeneration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

from deit_distill.training.commands.analyze import AnalyzeArguments, run_analysis  # noqa: E402
from deit_distill.training.commands.cache_teacher import run_cache_teacher  # noqa: E402
from deit_distill.training.commands.train import parse_args, run_training  # noqa: E402
from deit_distill.training.evaluation import metric_key  # noqa: E402
from deit_distill.training.run_record import RunRecord, read_eval_results  # noqa: E402
from deit_distill.training.teacher import (  # noqa: E402
    InputSpec,
    TeacherInputAdapter,
    load_teacher,
    load_teacher_image_processor,
    teacher_logits_from_output,
)
from deit_distill.training.transforms import build_train_transform, with_image_transform  # noqa: E402

RECIPES = ROOT / "training" / "recipes"
NOTES_MARKER = "<!-- notes -->"
PAPER = {
    "none": 72.2,
    "soft_plain": 72.2,
    "hard_plain": 74.3,
    "hard_token:dist": 74.6,
    "hard_token:avg": 74.5,
}


@dataclass(frozen=True)
class Student:
    name: str
    token: bool
    distillation: str
    teacher: str | None  # "convnet", "transformer" or None


STUDENTS = (
    Student("none", False, "none", None),
    Student("soft_plain", False, "soft", "convnet"),
    Student("hard_plain", False, "hard", "convnet"),
    Student("hard_token", True, "hard", "convnet"),
    Student("soft_token", True, "soft", "convnet"),
    Student("hard_token_vit", True, "hard", "transformer"),
)
# The reported rows: (label, run, head).
ROWS = (
    ("1. no distillation (plain ViT)", "none", "avg"),
    ("2. usual soft distillation (plain ViT)", "soft_plain", "avg"),
    ("3. hard distillation (plain ViT)", "hard_plain", "avg"),
    ("4. DIST token, DIST head", "hard_token", "dist"),
    ("5. DIST token, CLS+DIST average", "hard_token", "avg"),
    ("DIST token, CLS head", "hard_token", "cls"),
    ("soft distillation, DIST token (average)", "soft_token", "avg"),
    ("transformer teacher, DIST token (average)", "hard_token_vit", "avg"),
)


@dataclass
class TableConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    regimes: tuple[str, ...] = ("deit", "light")
    train_samples: int = 1000
    eval_samples: int = 2000
    student: str = "patch_size=7,hidden_size=64,num_hidden_layers=4,num_attention_heads=2"
    student_epochs: int = 24
    eval_every: int = 6  # epochs between evaluations (the accuracy-against-epochs plot)
    convnet_teacher: str = (
        "embedding_size=24,hidden_sizes=[32,64,128],depths=[1,1,1],downsample_in_first_stage=false"
    )
    convnet_teacher_epochs: int = 3
    transformer_teacher: str = "patch_size=7,hidden_size=128,num_hidden_layers=6,num_attention_heads=4"
    transformer_teacher_epochs: int = 20
    output_dir: str = "runs/paper_table"
    results: str = "docs/RESULTS.md"
    use_cache: bool = True
    augment_on: str = "workers"  # where the students' views are made (`--augment_on`)
    # Flags every run gets: batch 64 gives the short schedule twice the updates of the recipe's 128.
    extra: list[str] = field(default_factory=lambda: ["--per_device_train_batch_size", "64"])


QUICK = dict(
    seeds=(0,),
    train_samples=40,
    eval_samples=40,
    student="patch_size=7,hidden_size=16,num_hidden_layers=1,num_attention_heads=2",
    student_epochs=2,
    eval_every=1,
    convnet_teacher="embedding_size=8,hidden_sizes=[8],depths=[1],downsample_in_first_stage=false",
    convnet_teacher_epochs=1,
    transformer_teacher="patch_size=7,hidden_size=16,num_hidden_layers=1,num_attention_heads=2",
    transformer_teacher_epochs=1,
    extra=[
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "40",
        "--verify_images",
        "false",
    ],
)


def _common(config: TableConfig, seed: int, epochs: int, output_dir: Path) -> list[str]:
    return [
        "--max_train_samples", str(config.train_samples),
        "--max_eval_samples", str(config.eval_samples),
        "--num_train_epochs", str(epochs),
        "--seed", str(seed),
        "--output_dir", str(output_dir),
        "--overwrite_output_dir", "true",
        "--disable_tqdm", "true",
        "--logging_steps", "1000",
        *config.extra,
    ]  # fmt: skip


def teacher_argv(config: TableConfig, kind: str, seed: int, output_dir: Path) -> list[str]:
    if kind == "convnet":
        return [
            str(RECIPES / "fashion_mnist_teacher_cpu.json"),
            "--config_overrides", config.convnet_teacher,
            *_common(config, seed, config.convnet_teacher_epochs, output_dir),
        ]  # fmt: skip
    # The transformer teacher: a plain ViT trained with the teacher's recipe (light augmentation, no mixing).
    return [
        str(RECIPES / "fashion_mnist_teacher_cpu.json"),
        "--architecture", "deit_distill",
        "--use_distillation_token", "false",
        "--config_overrides", config.transformer_teacher,
        "--drop_path_rate", "0.0",
        "--learning_rate", "0.001",
        "--weight_decay", "0.05",
        *_common(config, seed, config.transformer_teacher_epochs, output_dir),
    ]  # fmt: skip


def student_argv(
    config: TableConfig, student: Student, regime: str, seed: int, output_dir: Path, teacher: str | None
) -> list[str]:
    argv = [
        str(RECIPES / "fashion_mnist_cpu.json"),
        "--config_overrides", config.student,
        "--augmentation", regime,
        "--augment_on", config.augment_on,
        "--use_distillation_token", str(student.token).lower(),
        "--distillation_type", student.distillation,
        "--eval_strategy", "steps",
        "--eval_steps", str(config.eval_every * -(-config.train_samples // _batch_size(config))),
        *_common(config, seed, config.student_epochs, output_dir),
    ]  # fmt: skip
    if student.distillation == "soft":
        argv += ["--tau", "3.0", "--alpha", "0.1"]  # the paper's soft distillation (section 5.2)
    if teacher:
        argv += ["--teacher", teacher]
    return argv


def _batch_size(config: TableConfig) -> int:
    extra = config.extra
    return (
        int(extra[extra.index("--per_device_train_batch_size") + 1])
        if "--per_device_train_batch_size" in extra
        else 128
    )


def timed(function, argv: list[str]) -> float:
    """CPU seconds of this process while `function(*parse_args(argv))` runs."""
    start = time.process_time()
    function(*parse_args(argv))
    return time.process_time() - start


def run_table(config: TableConfig, partial: Path | None = None, command: str = "") -> dict[str, Any]:
    """Train every teacher and student; return the per-seed results, saved to `partial` after every seed
    (`--render` makes the document from the seeds finished so far)."""
    out = Path(config.output_dir)
    started = time.time()
    runs: dict[str, Any] = {"config": asdict(config), "teachers": {}, "students": {}, "caches": {}}
    runs["config"]["seeds"], runs["command"] = [], command
    for seed in config.seeds:
        teachers = {}
        for kind in ("convnet", "transformer"):
            path = out / f"seed{seed}" / f"teacher_{kind}"
            cpu = timed(run_training, teacher_argv(config, kind, seed, path))
            results = read_eval_results(path)
            runs["teachers"][f"{kind}/{seed}"] = {"top1": results["eval_avg_top1"], "cpu_s": cpu}
            teachers[kind] = str(path)
            _progress(f"seed {seed} teacher {kind}: {100 * results['eval_avg_top1']:.1f}% in {cpu:.0f} CPU s")
        for regime in config.regimes:
            cache = None
            if config.use_cache:
                cache = out / f"seed{seed}" / regime / "cache_convnet"
                if cache.exists():  # a stale cache from other arguments would be refused, not replaced
                    shutil.rmtree(cache)
                hard = next(s for s in STUDENTS if s.name == "hard_token")
                argv = student_argv(
                    config, hard, regime, seed, cache.parent / "cache_run", teachers["convnet"]
                )
                runs["caches"][f"{regime}/{seed}"] = {
                    "cpu_s": timed(run_cache_teacher, [*argv, "--teacher_cache", str(cache)])
                }
            for student in STUDENTS:
                path = out / f"seed{seed}" / regime / student.name
                teacher = teachers[student.teacher] if student.teacher else None
                argv = student_argv(config, student, regime, seed, path, teacher)
                if cache is not None and student.teacher == "convnet":
                    argv += ["--teacher_cache", str(cache)]
                cpu = timed(run_training, argv)
                runs["students"][f"{regime}/{student.name}/{seed}"] = _student_result(path, student, cpu)
                _progress(
                    f"seed {seed} {regime} {student.name}: {_summary(runs['students'][f'{regime}/{student.name}/{seed}'])}"
                )
        runs["config"]["seeds"].append(seed)  # the document reports finished seeds only
        runs["wall_s"] = time.time() - started
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(runs, indent=1))
    return runs


def teacher_view_accuracy(teacher_dir: Path, student_dir: Path, regime: str, seed: int) -> float:
    """A teacher's top-1 on the held-out images seen through the students' training augmentation (no mixing):
    how often its hard labels are right on views like the ones it labels during training."""
    torch.manual_seed(seed)
    processor = AutoImageProcessor.from_pretrained(student_dir)
    record = RunRecord.read(student_dir)
    examples = with_image_transform(
        record.data_arguments().load(seed=seed)["validation"], build_train_transform(processor, regime)
    )
    teacher = load_teacher(str(teacher_dir))
    adapter = TeacherInputAdapter(
        InputSpec.from_image_processor(processor),
        InputSpec.from_image_processor(load_teacher_image_processor(str(teacher_dir))),
    )
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(examples, batch_size=250):
            logits = teacher_logits_from_output(teacher(adapter(batch["pixel_values"])))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(examples)


def add_diagnostics(runs: dict[str, Any]) -> None:
    """Fill in, for every finished seed and regime (the runs must still be on disk), each teacher's top-1 on the
    students' augmented views (`teacher_views`) and how often the token students' DIST head agrees with their
    own teacher on the test images (`teacher_agreement`)."""
    config = runs["config"]
    views = runs.setdefault("teacher_views", {})
    agreement = runs.setdefault("teacher_agreement", {})
    for seed in config["seeds"]:
        base = Path(config["output_dir"]) / f"seed{seed}"
        for regime in config["regimes"]:
            for kind, student in (("convnet", "hard_token"), ("transformer", "hard_token_vit")):
                key = f"{kind}/{regime}/{seed}"
                if key not in views:
                    views[key] = teacher_view_accuracy(
                        base / f"teacher_{kind}", base / regime / "hard_token", regime, seed
                    )
                if key not in agreement:
                    path = base / regime / student
                    record = RunRecord.read(path)
                    analysis = run_analysis(
                        str(path), record.data_arguments(), AnalyzeArguments(), record.seed
                    )
                    agreement[key] = analysis["teacher_agreement"]["dist"]


def _student_result(path: Path, student: Student, cpu: float) -> dict[str, Any]:
    final = read_eval_results(path)
    heads = ("cls", "dist", "avg") if student.token else ("avg",)
    state = json.loads((path / "trainer_state.json").read_text())
    curve = [
        (entry["epoch"], entry[metric_key("avg", 1, "eval_")])
        for entry in state["log_history"]
        if metric_key("avg", 1, "eval_") in entry
    ]
    result = {"cpu_s": cpu, "curve": curve, **{head: final[metric_key(head, 1, "eval_")] for head in heads}}
    if student.token and student.teacher:
        record = RunRecord.read(path)
        analysis = run_analysis(
            str(path), record.data_arguments(), AnalyzeArguments(teacher="none"), record.seed
        )
        result["cls_dist_cosine"] = analysis["cls_dist_cosine"]
        result["head_weight_cosine"] = analysis["head_weight_cosine"]
        result["heads_agree"] = analysis["heads_agree"]
    return result


def _summary(result: dict[str, Any]) -> str:
    return f"{100 * result['avg']:.1f}% (avg head) in {result['cpu_s']:.0f} CPU s"


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class UnlabeledConfig:
    """A few labelled images and many unlabelled ones: Fashion-MNIST's training split, `labelled` of its images
    (a stratified subset fixed by the seed) with labels and all the others without. The teacher is the demo's
    convnet recipe trained on the labelled images alone. The students (the table's student size, the `light`
    augmentation with Mixup/CutMix, hard distillation with the DIST token) all train for the same number of
    optimizer steps: `unlabeled_epochs` passes over labelled + unlabelled images."""

    seeds: tuple[int, ...] = (0, 1, 2)
    labelled: int = 2000
    unlabeled: int | None = None  # None: every other training image (58,000 for 2,000 labelled)
    eval_samples: int = 2000
    student: str = TableConfig.student
    regime: str = "light"
    unlabeled_epochs: int = 3
    long_epochs: int | None = 10  # a longer budget for the student with unlabelled images (None: skip it)
    short_epochs: int = 24  # the table's budget, for the labelled images alone
    teacher_epochs: int = 40  # the demo teacher's recipe
    output_dir: str = "runs/paper_table"
    extra: list[str] = field(default_factory=lambda: ["--per_device_train_batch_size", "64"])


QUICK_UNLABELED = dict(
    seeds=(0,),
    labelled=40,
    unlabeled=40,
    eval_samples=40,
    student=QUICK["student"],
    unlabeled_epochs=1,
    long_epochs=2,
    short_epochs=1,
    teacher_epochs=1,
    extra=QUICK["extra"],
)
# (key, description, distilled, with the unlabelled images, budget): budget "short" is `short_epochs` on the
# labelled images, "equal" the unlabelled run's number of steps, "long" `long_epochs` over all images.
UNLABELED_RUNS = (
    ("unlabeled_distilled", "2,000 labelled + 58,000 unlabelled, hard distillation", True, True, "equal"),
    ("labelled_short", "2,000 labelled, no teacher, the table's budget", False, False, "short"),
    ("labelled", "2,000 labelled, no teacher", False, False, "equal"),
    ("labelled_distilled", "2,000 labelled, hard distillation", True, False, "equal"),
    ("unlabeled_distilled_long", "2,000 labelled + 58,000 unlabelled, hard distillation", True, True, "long"),
    ("labelled_distilled_long", "2,000 labelled, hard distillation", True, False, "long"),
    ("labelled_long", "2,000 labelled, no teacher", False, False, "long"),
)


def unlabeled_argv(config: UnlabeledConfig, seed: int, key: str, steps: int | None = None) -> list[str]:
    """The `train` arguments of run `key` ("teacher" or one of `UNLABELED_RUNS`) of one seed; `steps` is the
    number of steps of the run with unlabelled images of the same budget, which a run without them trains for."""
    out = Path(config.output_dir) / "unlabeled" / f"seed{seed}"
    data = [
        "--max_train_samples", str(config.labelled),
        "--max_eval_samples", str(config.eval_samples),
        "--seed", str(seed),
        "--overwrite_output_dir", "true",
        "--disable_tqdm", "true",
        "--logging_steps", "1000",
        *config.extra,
    ]  # fmt: skip
    if key == "teacher":
        return [str(RECIPES / "fashion_mnist_teacher_cpu.json"), *data,
                "--num_train_epochs", str(config.teacher_epochs), "--output_dir", str(out / key)]  # fmt: skip
    _, _, distilled, with_unlabeled, budget = next(run for run in UNLABELED_RUNS if run[0] == key)
    argv = [
        str(RECIPES / "fashion_mnist_cpu.json"), *data,
        "--config_overrides", config.student,
        "--augmentation", config.regime,
        "--distillation_type", "hard" if distilled else "none",
        "--output_dir", str(out / key),
    ]  # fmt: skip
    argv += ["--teacher", str(out / "teacher")] if distilled else []
    if with_unlabeled:
        argv += ["--unlabeled_dataset", "fashion_mnist"]
        argv += [] if config.unlabeled is None else ["--max_unlabeled_samples", str(config.unlabeled)]
    epochs = {"short": config.short_epochs, "long": config.long_epochs, "equal": config.unlabeled_epochs}[
        budget
    ]
    argv += ["--num_train_epochs", str(epochs)]
    if budget != "short" and not with_unlabeled:
        argv += ["--max_steps", str(steps)]
    return argv


def run_unlabeled_seed(
    config: UnlabeledConfig, seed: int, saved: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train the teacher and the students of one seed; return their results. A run whose arguments equal
    those of a run in `saved` (an earlier result of this seed) is not trained again."""
    saved_runs = {"teacher": (saved or {}).get("teacher", {}), **(saved or {}).get("students", {})}
    result: dict[str, Any] = {"teacher": {}, "students": {}}
    budgets = {run[0]: run[4] for run in UNLABELED_RUNS}
    steps: dict[str, int] = {}  # budget -> steps of its run with unlabelled images (which runs first)
    for key in ("teacher", *(run[0] for run in UNLABELED_RUNS)):
        if budgets.get(key) == "long" and not config.long_epochs:
            continue
        argv = unlabeled_argv(config, seed, key, steps.get(budgets.get(key)))
        path = Path(argv[argv.index("--output_dir") + 1])
        if saved_runs.get(key, {}).get("argv") == argv and (key != "teacher" or path.is_dir()):
            run = saved_runs[key]
        else:
            run = {"argv": argv, "cpu_s": timed(run_training, argv)}
            final = read_eval_results(path)
            record = RunRecord.read(path)
            run["steps"] = record.training["steps"]
            if key == "teacher":
                run["top1"] = final["eval_avg_top1"]
            else:
                run["num_unlabeled"] = record.data.get("num_unlabeled_examples") or 0
                run.update({head: final[metric_key(head, 1, "eval_")] for head in ("cls", "dist", "avg")})
            if "--teacher" in argv:
                analysis = run_analysis(str(path), record.data_arguments(), AnalyzeArguments(), record.seed)
                run["teacher_agreement"] = analysis["teacher_agreement"]["avg"]
            _progress(f"unlabelled, seed {seed}, {key}: {100 * run.get('avg', run.get('top1')):.1f}% in "
                      f"{run['cpu_s']:.0f} CPU s, {run['steps']} steps")  # fmt: skip
        if key == "teacher":
            result["teacher"] = run
        else:
            result["students"][key] = run
        if key in ("unlabeled_distilled", "unlabeled_distilled_long"):
            steps[budgets[key]] = run[
                "steps"
            ]  # the runs of this budget without unlabelled images train as long
    return result


def run_unlabeled(config: UnlabeledConfig) -> None:
    """Run every seed of `config`, each saved to `unlabeled/seed<N>.json` as soon as it is done; runs already
    saved there with the same arguments are kept (so a longer budget adds only its own run)."""
    folder = Path(config.output_dir) / "unlabeled"
    for seed in config.seeds:
        path = folder / f"seed{seed}.json"
        saved = json.loads(path.read_text()) if path.exists() else None
        started = time.time()
        result = run_unlabeled_seed(config, seed, saved)
        result.update(config=asdict(config), seed=seed, wall_s=time.time() - started)
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


def gather_unlabeled(output_dir: Path) -> dict[str, Any] | None:
    """Every finished seed's results of the unlabelled part, by seed."""
    files = sorted((output_dir / "unlabeled").glob("seed*.json"))
    seeds = [json.loads(path.read_text()) for path in files]
    return {"seeds": sorted(seeds, key=lambda result: result["seed"])} if seeds else None


def render_unlabeled(unlabeled: dict[str, Any]) -> list[str]:
    seeds = unlabeled["seeds"]
    config = seeds[0]["config"]
    teacher = [result["teacher"]["top1"] for result in seeds]
    num_unlabeled = seeds[0]["students"]["unlabeled_distilled"]["num_unlabeled"]
    lines = [
        "## Beyond the paper: unlabelled images",
        "",
        f"Fashion-MNIST's training split: {config['labelled']:,} images with labels (a stratified subset fixed by "
        f"the seed), the other {num_unlabeled:,} without (`--unlabeled_dataset fashion_mnist`: the training "
        "data's own rows outside `--max_train_samples`); they contribute only the distillation term. Top-1 on "
        f"{config['eval_samples']:,} held-out test images, seeds {', '.join(str(r['seed']) for r in seeds)}. "
        f"Teacher: the demo's convnet recipe on the labelled images alone, {config['teacher_epochs']} epochs. "
        f"Students: `{config['student']}`, augmentation `{config['regime']}` with Mixup/CutMix. Rows with the "
        "same number of steps are compared at equal optimizer steps: the run with unlabelled images sets it "
        f"({config['unlabeled_epochs']} epochs, or {config['long_epochs']} for the longer budget, over labelled + "
        "unlabelled images) and the labelled-only runs train for as many steps.",
        "",
        "| run | top-1 (averaged heads) | DIST head | agreement with the teacher | CPU min |",
        "|---|---|---|---|---|",
        f"| teacher (convnet, labelled images only) | {_fmt(teacher)} | - | - | "
        f"{statistics.mean(r['teacher']['cpu_s'] for r in seeds) / 60:.2f} |",
    ]
    shown = (
        "labelled_short",
        "labelled",
        "labelled_distilled",
        "unlabeled_distilled",
        "labelled_long",
        "labelled_distilled_long",
        "unlabeled_distilled_long",
    )
    for key, description, distilled, _, _ in sorted(UNLABELED_RUNS, key=lambda run: shown.index(run[0])):
        if not all(key in result["students"] for result in seeds):
            continue
        runs = [result["students"][key] for result in seeds]
        steps = runs[0]["steps"]
        label = description.replace("2,000", f"{config['labelled']:,}").replace(
            "58,000", f"{num_unlabeled:,}"
        )
        agreement = _fmt([r["teacher_agreement"] for r in runs]) if distilled else "-"
        lines.append(
            f"| {label} ({steps:,} steps) | {_fmt([r['avg'] for r in runs])} | {_fmt([r['dist'] for r in runs])} "
            f"| {agreement} | {statistics.mean(r['cpu_s'] for r in runs) / 60:.2f} |"
        )
    best = [result["students"]["unlabeled_distilled"]["avg"] for result in seeds]
    lines += [
        "",
        "| comparison | here |",
        "|---|---|",
        f"| the student with unlabelled images beats its teacher | {verdict(best, teacher)} |",
        "| ... beats the same student distilled on the labelled images alone, same steps | "
        f"{verdict(best, [r['students']['labelled_distilled']['avg'] for r in seeds])} |",
        "| ... beats the student without a teacher, same steps | "
        f"{verdict(best, [r['students']['labelled']['avg'] for r in seeds])} |",
    ]
    if all("unlabeled_distilled_long" in result["students"] for result in seeds):
        long = [result["students"]["unlabeled_distilled_long"]["avg"] for result in seeds]
        lines.append(
            f"| the longer-trained student with unlabelled images beats its teacher | {verdict(long, teacher)} |"
        )
    if all("labelled_distilled_long" in result["students"] for result in seeds):
        alone = [result["students"]["labelled_distilled_long"]["avg"] for result in seeds]
        lines.append(
            "| ... beats the same student distilled on the labelled images alone, same longer budget | "
            f"{verdict(long, alone)} |"
        )
    if all({"labelled_distilled_long", "labelled_long"} <= set(result["students"]) for result in seeds):
        lines.append(
            "| distillation beats no teacher on the labelled images alone, longer budget | "
            + verdict(
                [result["students"]["labelled_distilled_long"]["avg"] for result in seeds],
                [result["students"]["labelled_long"]["avg"] for result in seeds],
            )
            + " |"
        )
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------- the document


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def row_values(runs: dict[str, Any], regime: str, run: str, head: str) -> list[float]:
    seeds = runs["config"]["seeds"]
    return [runs["students"][f"{regime}/{run}/{seed}"][head] for seed in seeds]


def verdict(better: list[float], worse: list[float]) -> str:
    """Whether `better` beat `worse` seed for seed, and by how much against the seed-to-seed spread."""
    diffs = [100 * (b - w) for b, w in zip(better, worse, strict=True)]
    mean, std = mean_std(diffs)
    wins = sum(d > 0 for d in diffs)
    held = "held" if mean > 0 else "did not hold"
    call = "within noise" if len(diffs) > 1 and abs(mean) <= std else held
    return f"{call} ({mean:+.1f} points, {wins}/{len(diffs)} seeds)"


# (claim, the run/head that should win, the one it should beat)
CLAIMS = (
    ("hard distillation beats no distillation (row 3 > row 1)", ("hard_plain", "avg"), ("none", "avg")),
    (
        "soft distillation beats no distillation (row 2 > row 1; the paper: equal)",
        ("soft_plain", "avg"),
        ("none", "avg"),
    ),
    ("hard beats soft distillation, plain ViT (row 3 > row 2)", ("hard_plain", "avg"), ("soft_plain", "avg")),
    (
        "the DIST token beats hard distillation without it (row 4 > row 3)",
        ("hard_token", "dist"),
        ("hard_plain", "avg"),
    ),
    (
        "the average is at least the DIST head (row 5 >= row 4; the paper: -0.1 to +0.3)",
        ("hard_token", "avg"),
        ("hard_token", "dist"),
    ),
    ("the DIST head beats the CLS head", ("hard_token", "dist"), ("hard_token", "cls")),
    ("hard beats soft distillation, with the token", ("hard_token", "avg"), ("soft_token", "avg")),
    ("a convnet teacher beats a transformer teacher", ("hard_token", "avg"), ("hard_token_vit", "avg")),
)


def describe_machine() -> str:
    """The machine this process runs on, from the machine itself: OS, CPU, cores, torch, threads, any GPU."""
    cpu = platform.processor() or platform.machine()
    text = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
    text += f", {torch.get_num_threads()} thread(s)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def render(runs: dict[str, Any], wall_s: float, command: str) -> str:
    config = runs["config"]
    seeds = config["seeds"]
    teachers = {
        kind: _fmt([runs["teachers"][f"{kind}/{s}"]["top1"] for s in seeds])
        for kind in ("convnet", "transformer")
    }
    teacher_cpu = {
        kind: statistics.mean(runs["teachers"][f"{kind}/{s}"]["cpu_s"] for s in seeds) / 60
        for kind in ("convnet", "transformer")
    }
    lines = [
        "# What distillation buys, measured: the paper's table at CPU scale",
        "",
        f"Generated by `{command}` ({wall_s / 60:.1f} min wall clock on {runs.get('machine') or 'a machine the runs did not record'}). "
        "Fashion-MNIST, {config['train_samples']:,} training images (a stratified subset fixed by the "
        f"seed), top-1 on {config['eval_samples']:,} held-out test images, seeds {', '.join(map(str, seeds))} "
        "(mean ± standard deviation over seeds, %). A seed changes the subset, the initialisation and the augmentation "
        "draws; within a seed and regime every student draws exactly the same augmented views.",
        "",
        f"- Student: DeiT from scratch, `{config['student']}`, {config['student_epochs']} epochs, batch {_batch_size(TableConfig(extra=config['extra']))}, "
        "AdamW lr 2e-3, cosine, label smoothing 0.1, Mixup/CutMix (the recipe `fashion_mnist_cpu.json`).",
        f"- Convnet teacher (ResNet, `{config['convnet_teacher']}`, {config['convnet_teacher_epochs']} epochs): "
        f"**{teachers['convnet']}**; transformer teacher (plain ViT, `{config['transformer_teacher']}`, "
        f"{config['transformer_teacher_epochs']} epochs): **{teachers['transformer']}**. Both on the student's "
        f"images, light augmentation; CPU minutes per teacher: {teacher_cpu['convnet']:.1f} and "
        f"{teacher_cpu['transformer']:.1f}.",
        "- Soft distillation uses the paper's tau = 3, alpha = 0.1 (KL normalised as the official code, by batch x "
        "classes); hard distillation alpha = 0.5.",
        "- Augmentation `deit`: the paper's recipe (RandomResizedCrop 8-100%, RandAugment m9, random erasing 0.25). "
        "`light`: crops of 80-100% and flips. Both with Mixup 0.8 / CutMix 1.0.",
        "",
    ]
    for regime in config["regimes"]:
        cache_cpu = (
            statistics.mean(runs["caches"][f"{regime}/{s}"]["cpu_s"] for s in seeds) / 60
            if runs["caches"]
            else None
        )
        lines += [
            f"## Augmentation `{regime}`",
            "",
            "| row | top-1 | paper (DeiT-Ti) | CPU min per run |",
            "|---|---|---|---|",
        ]
        for label, run, head in ROWS:
            cpu = statistics.mean(runs["students"][f"{regime}/{run}/{s}"]["cpu_s"] for s in seeds) / 60
            paper = PAPER.get(run if run != "hard_token" else f"{run}:{head}", "-")
            lines.append(f"| {label} | {_fmt(row_values(runs, regime, run, head))} | {paper} | {cpu:.2f} |")
        views = {
            kind: _fmt(
                [runs.get("teacher_views", {}).get(f"{kind}/{regime}/{s}", float("nan")) for s in seeds]
            )
            for kind in ("convnet", "transformer")
        }
        agreements = {
            kind: _fmt(
                [runs.get("teacher_agreement", {}).get(f"{kind}/{regime}/{s}", float("nan")) for s in seeds]
            )
            for kind in ("convnet", "transformer")
        }
        lines += [
            "",
            f"Convnet teacher {teachers['convnet']}, transformer teacher {teachers['transformer']} on the test "
            f"images; on the same images seen through this regime's training augmentation (no Mixup/CutMix), "
            f"the labels a teacher hands out during training: convnet {views['convnet']}, transformer "
            f"{views['transformer']}. The DIST head of the hard-distilled token student agrees with its own "
            f"teacher on the test images: convnet-taught {agreements['convnet']}, transformer-taught "
            f"{agreements['transformer']}."
            + (
                f" The convnet teacher's cache cost {cache_cpu:.2f} CPU min per seed (shared by its four students, "
                "which ran no teacher forward)."
                if cache_cpu is not None
                else ""
            ),
            "",
            "| the paper's finding | here |",
            "|---|---|",
        ]
        for claim, better, worse in CLAIMS:
            lines.append(
                f"| {claim} | {verdict(row_values(runs, regime, *better), row_values(runs, regime, *worse))} |"
            )
        cosines = [runs["students"][f"{regime}/hard_token/{s}"]["cls_dist_cosine"] for s in seeds]
        depth_means = [statistics.mean(values) for values in zip(*cosines, strict=True)]
        weights = [runs["students"][f"{regime}/hard_token/{s}"]["head_weight_cosine"] for s in seeds]
        agree = [runs["students"][f"{regime}/hard_token/{s}"]["heads_agree"] for s in seeds]
        lines += [
            "",
            "Inside the hard-distilled student with the token (`deit-distill analyze`, mean over seeds): cosine "
            "between the CLS and DIST token outputs at the embedding, then after each block: "
            + ", ".join(f"{value:.2f}" for value in depth_means)
            + f" (the paper: 0.06 for the learned tokens, 0.93 at the last layer); head weight cosine "
            f"{statistics.mean(weights):.2f}; the two heads predict the same class on {100 * statistics.mean(agree):.1f}% "
            "of the test images.",
            "",
        ]
    lines += [
        "## Accuracy against epochs",
        "",
        "![accuracy against epochs](paper_table.png)",
        "",
        "Mean over seeds of the averaged heads' top-1 on the held-out images, evaluated every "
        f"{config['eval_every']} epochs. Per-seed numbers: `paper_table.json`.",
        "",
    ]
    return "\n".join(lines)


def plot(runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = runs["config"]
    regimes = config["regimes"]
    figure, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False)
    for axis, regime in zip(axes[0], regimes, strict=True):
        for student in STUDENTS:
            curves = [runs["students"][f"{regime}/{student.name}/{s}"]["curve"] for s in config["seeds"]]
            epochs = [epoch for epoch, _ in curves[0]]
            means = [
                100 * statistics.mean(point)
                for point in zip(*[[a for _, a in c] for c in curves], strict=True)
            ]
            axis.plot(epochs, means, marker="o", label=student.name)
        axis.set_title(f"augmentation {regime}")
        axis.set_xlabel("epoch")
        axis.set_ylabel("top-1 (%), averaged heads")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_document(
    runs: dict[str, Any], wall_s: float, command: str, results: Path, unlabeled: dict[str, Any] | None = None
) -> None:
    """Write the document, its plot and `paper_table.json`; the unlabelled part (`unlabeled.json`) when given
    or already next to the document."""
    results.parent.mkdir(parents=True, exist_ok=True)
    notes = ""
    if results.exists() and NOTES_MARKER in results.read_text():
        notes = results.read_text().split(NOTES_MARKER, 1)[1]
    (results.parent / "paper_table.json").write_text(json.dumps(runs, indent=1))
    unlabeled_json = results.parent / "unlabeled.json"
    if unlabeled is not None:
        unlabeled_json.write_text(json.dumps(unlabeled, indent=1))
    elif unlabeled_json.exists():
        unlabeled = json.loads(unlabeled_json.read_text())
    plot(runs, results.parent / "paper_table.png")
    text = render(runs, wall_s, command)
    if unlabeled is not None:
        text += "\n".join(["", *render_unlabeled(unlabeled)])
    results.write_text(text + "\n" + NOTES_MARKER + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and data, one seed (seconds)")
    parser.add_argument(
        "--part",
        choices=("table", "unlabeled", "all"),
        default="table",
        help="the paper's table (default, 45 min), the unlabelled-images part (about 20 CPU min per seed), or both",
    )
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--regimes", nargs="+", choices=("deit", "light"))
    parser.add_argument("--output_dir", help="where the runs go (default runs/paper_table)")
    parser.add_argument("--results", help="the document to write (default docs/RESULTS.md)")
    parser.add_argument("--no_cache", action="store_true", help="run the convnet teacher live in every run")
    parser.add_argument(
        "--augment_on", choices=("workers", "device"), help="where the students' views are made"
    )
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="only write the document from a paper_table.json (e.g. a partial run) and the unlabelled seeds found",
    )
    for name in (
        "train_samples",
        "eval_samples",
        "student_epochs",
        "convnet_teacher_epochs",
        "transformer_teacher_epochs",
    ):
        parser.add_argument(f"--{name}", type=int)
    args = parser.parse_args(argv)
    config = TableConfig(**QUICK) if args.quick else TableConfig()
    unlabeled_config = UnlabeledConfig(**QUICK_UNLABELED) if args.quick else UnlabeledConfig()
    if args.output_dir:
        unlabeled_config = replace(unlabeled_config, output_dir=args.output_dir)
    if args.seeds:
        unlabeled_config = replace(unlabeled_config, seeds=tuple(args.seeds))
    results = Path(args.results or config.results)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.render:
        runs = json.loads(Path(args.render).read_text())
        add_diagnostics(runs)
        unlabeled = gather_unlabeled(Path(runs["config"]["output_dir"]))
        write_document(runs, runs["wall_s"], runs["command"], results, unlabeled)
        return 0
    overrides = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("quick", "no_cache", "render", "part", "results")
    }
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    config = replace(config, **overrides, use_cache=not args.no_cache)
    command = " ".join(["python bench/paper_table.py", *(argv if argv is not None else sys.argv[1:])])
    if args.part in ("unlabeled", "all"):
        run_unlabeled(unlabeled_config)
    unlabeled = gather_unlabeled(Path(unlabeled_config.output_dir))
    if args.part == "unlabeled":
        # The table's own numbers stay as they are: re-render them with the unlabelled seeds gathered so far.
        table_json = results.parent / "paper_table.json"
        if not table_json.exists():
            raise SystemExit(f"{table_json} not found: run --part table first (or --part all).")
        runs = json.loads(table_json.read_text())
        write_document(runs, runs["wall_s"], runs["command"], results, unlabeled)
        print(f"wrote {results} with the unlabelled seeds in {unlabeled_config.output_dir}/unlabeled")
        return 0
    partial = Path(config.output_dir) / "paper_table.json"
    runs = run_table(config, partial, command)
    runs["machine"] = describe_machine()  # the machine that ran them, recorded with them for later renders
    add_diagnostics(runs)
    write_document(runs, runs["wall_s"], command, results, unlabeled)
    print(f"wrote {results} in {runs['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
