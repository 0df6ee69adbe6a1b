"""What the teacher cache saves: step time with a live teacher, from the cache and for the student alone; the
precompute rate of `cache-teacher`; the cache's size per image and epoch.

    python bench/teacher_cache.py steps --threads 1 --steps 3 --repeats 3     # the step-time table
    python bench/teacher_cache.py precompute --threads 1                      # views/s of cache-teacher (demo)
    python bench/teacher_cache.py size                                        # bytes per view, K = 10 and all
    python bench/teacher_cache.py lookup                                      # per-step lookup cost and memory

`steps`: a plain PyTorch training step (forward, `DistillationLoss`, backward, AdamW) on one pre-made batch, in
three modes that take turns inside every repeat (the median repeat is reported): "student only" (loss "none"),
"live teacher" (the teacher's forward under no_grad, then hard distillation) and "from cache" (the teacher's
top-K read from a cache on disk by the batch's view keys with `TeacherCache.teacher_logits`, then hard
distillation; the epoch's table is read before timing, as it is once per epoch in training). Rows: the demo
(28-px DeiT student and the demo's convnet teacher, batch 128) and DeiT-Ti / DeiT-S against timm's
`regnety_160` (RegNetY-16GF, random weights) at 224 px, 1000 classes, batch 8. The cache in the step-time rows
is written by the library's shard writer with random top-10 values (its read cost does not depend on them).

`precompute`: `deit-distill cache-teacher` on the demo recipe (2,000 images, one epoch, the demo-sized teacher
with random weights), wall time per view, data augmentation included.

`lookup`: a one-epoch ImageNet-sized cache (1,281,167 views, 1,000 classes, K = 10) laid out as 8 processes x
128 write it, and one at K = all at a tenth of the size (the per-step cost and the memory held depend on the
window, not the epoch: the reader holds at most two windows of about 64 MiB); one process's lookups
(`TeacherCache.teacher_logits`) step by step, as training makes them, the window reads ahead included.

`size`: shards written by the library for 1,000 classes (ImageNet's) and 10 (the demo's), K = 10 and K = all,
float16, with realistic (peaked) teacher distributions; bytes on disk per view, i.e. per image and epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import build_student, build_teacher

from deit_distill.modeling_deit_distill import DeiTDistillConfig, DeiTDistillForImageClassification
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.teacher_cache import (
    CACHE_FORMAT,
    DATA_DIR,
    DTYPES,
    METADATA_FILE,
    TeacherCache,
    _ShardWriter,
)
from deit_distill.training.views import ViewKey

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def write_synthetic_cache(
    directory: Path,
    num_views: int,
    num_classes: int,
    top_k: int,
    dtype: str = "float16",
    global_batch: int = 1,
) -> Path:
    """A complete one-epoch cache of `num_views` views with peaked random teacher distributions."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(num_views, num_classes, generator=generator) * 3
    values, indices = torch.log_softmax(logits, -1).topk(top_k, -1)
    index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    writer = _ShardWriter(
        directory / DATA_DIR / "epoch-00000" / "process-00000-of-00001", 0, DTYPES[dtype][1], top_k
    )
    positions = np.arange(num_views)
    writer.add(
        {
            "epoch": np.zeros(num_views, dtype=np.int64),
            "position": positions,
            "index": positions,
            "repeat": np.zeros(num_views, dtype=np.int64),
            "topk_indices": indices.numpy().astype(index_dtype),
            "topk_log_probs": values.numpy().astype(DTYPES[dtype][0]),
        }
    )
    writer.flush(1)
    metadata = {
        "format": CACHE_FORMAT,
        "views": {"seed": 0},
        "storage": {"epochs": 1, "top_k": top_k, "num_classes": num_classes, "dtype": dtype},
        "layout": {"global_batch_size": global_batch, "per_device_batch_size": global_batch},
        "complete": True,
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    return directory


def write_imagenet_sized_cache(
    directory: Path, num_views: int, num_classes: int, top_k: int, processes: int, per_device: int
) -> Path:
    """A one-epoch cache as `processes` writers of `per_device` views a step write it (shards of 50,000 views,
    row groups of `ROW_GROUP_VIEWS`), with random top-K ids and sorted random log-probabilities; written in
    slices so no more than one shard is in memory."""
    rng = np.random.default_rng(0)
    global_batch = processes * per_device
    steps = num_views // global_batch
    steps_per_shard = max(1, 50_000 // per_device)
    index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    for process in range(processes):
        folder = directory / DATA_DIR / "epoch-00000" / f"process-{process:05d}-of-{processes:05d}"
        for start in range(0, steps, steps_per_shard):
            end = min(steps, start + steps_per_shard)
            positions = (
                np.arange(start, end)[:, None] * global_batch + process * per_device + np.arange(per_device)
            ).reshape(-1)
            if top_k == num_classes:
                ids = np.argsort(rng.random((len(positions), num_classes), dtype=np.float32), axis=1)
            else:
                ids = rng.integers(0, num_classes, (len(positions), top_k))
            values = -np.sort(rng.exponential(2.0, (len(positions), top_k)).astype(np.float32), axis=1)
            writer = _ShardWriter(folder, start, DTYPES["float16"][1], top_k)
            writer.add(
                {
                    "epoch": np.zeros(len(positions), dtype=np.int64),
                    "position": positions,
                    "index": positions,
                    "repeat": np.zeros(len(positions), dtype=np.int64),
                    "topk_indices": ids.astype(index_dtype),
                    "topk_log_probs": values.astype(np.float16),
                }
            )
            writer.flush(end)
    metadata = {
        "format": CACHE_FORMAT,
        "views": {"seed": 0},
        "storage": {"epochs": 1, "top_k": top_k, "num_classes": num_classes, "dtype": "float16"},
        "layout": {"global_batch_size": global_batch, "per_device_batch_size": per_device},
        "complete": True,
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    return directory


def keys_for(batch_size: int, step: int) -> torch.Tensor:
    return torch.tensor(
        [
            list(ViewKey(0, 0, step, index=p, position=p))
            for p in range(step * batch_size, (step + 1) * batch_size)
        ]
    )


class Row:
    """One student/teacher pair and its three step functions."""

    def __init__(
        self, name: str, student, teacher, pixels: torch.Tensor, num_classes: int, cache_dir: Path
    ) -> None:
        self.name, self.student, self.teacher, self.pixels = name, student.train(), teacher, pixels
        self.labels = torch.randint(
            0, num_classes, (len(pixels),), generator=torch.Generator().manual_seed(0)
        )
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        self.none = DistillationLoss("none", label_smoothing=0.1)
        self.hard = DistillationLoss("hard", alpha=0.5, label_smoothing=0.1)
        self.cache = TeacherCache(
            write_synthetic_cache(
                cache_dir, 64 * len(pixels), num_classes, min(10, num_classes), global_batch=len(pixels)
            )
        )
        self.cache.teacher_logits(
            keys_for(len(pixels), 0)
        )  # reads the epoch's table, once per epoch in training
        self.step_index = 0

    def _step(self, loss_fn: DistillationLoss, teacher_logits: Callable[[], torch.Tensor | None]) -> None:
        outputs = self.student(self.pixels)
        loss = loss_fn(outputs, self.labels, teacher_logits()).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def student_only(self) -> None:
        self._step(self.none, lambda: None)

    def live_teacher(self) -> None:
        def logits() -> torch.Tensor:
            with torch.no_grad():
                output = self.teacher(self.pixels)
            return getattr(output, "logits", output)

        self._step(self.hard, logits)

    def from_cache(self) -> None:
        self.step_index = (self.step_index + 1) % 64
        self._step(
            self.hard,
            lambda: self.cache.teacher_logits(keys_for(len(self.pixels), self.step_index), hard=True),
        )

    def teacher_forward(self) -> None:
        with torch.no_grad():
            self.teacher(self.pixels)


def time_modes(
    modes: dict[str, Callable[[], None]], steps: int, warmup: int, repeats: int, clock
) -> dict[str, float]:
    """Median over repeats of the mean time per call; modes take turns in every repeat, rotating who goes first."""
    for mode in modes.values():
        for _ in range(warmup):
            mode()
    names, times = list(modes), {name: [] for name in modes}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            start = clock()
            for _ in range(steps):
                modes[name]()
            times[name].append((clock() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_steps(args: argparse.Namespace, workdir: Path) -> None:
    import timm

    clock = CLOCKS[args.clock]
    rows = []
    torch.manual_seed(0)
    rows.append(
        lambda: Row(
            "demo (DeiT 28 px, ResNet 0.3M)",
            build_student(),
            build_teacher(),
            torch.randn(128, 3, 28, 28),
            10,
            workdir / "demo",
        )
    )
    for variant in ("tiny", "small"):

        def make(variant: str = variant) -> Row:
            torch.manual_seed(0)
            student = DeiTDistillForImageClassification(
                DeiTDistillConfig.from_variant(variant, num_labels=1000)
            )
            teacher = (
                timm.create_model("regnety_160", pretrained=False, num_classes=1000)
                .eval()
                .requires_grad_(False)
            )
            pixels = torch.randn(args.batch_size, 3, 224, 224)
            name = {"tiny": "DeiT-Ti", "small": "DeiT-S"}[variant] + ", RegNetY-16GF"
            return Row(name, student, teacher, pixels, 1000, workdir / variant)

        rows.append(make)
    print(
        f"threads {torch.get_num_threads()}, clock {args.clock}, {args.steps} steps x {args.repeats} repeats (median)"
    )
    print(
        "| student | batch | student only | live teacher | from cache | live / student | cache / student | teacher forward |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for make in rows if args.rows == "all" else [rows[int(i)] for i in args.rows.split(",")]:
        row = make()
        modes = {
            "student": row.student_only,
            "live": row.live_teacher,
            "cache": row.from_cache,
            "teacher": row.teacher_forward,
        }
        t = time_modes(modes, args.steps, args.warmup, args.repeats, clock)
        print(
            f"| {row.name} | {len(row.pixels)} | {t['student']:.3f} s | {t['live']:.3f} s | {t['cache']:.3f} s | "
            f"{t['live'] / t['student']:.2f}x | {t['cache'] / t['student']:.3f}x | {t['teacher']:.3f} s |",
            flush=True,
        )
        del row


def bench_precompute(args: argparse.Namespace, workdir: Path) -> None:
    from deit_distill.training.commands.cache_teacher import main as cache_teacher
    from deit_distill.training.data import FASHION_MNIST_CLASSES

    teacher = build_teacher()
    teacher.config.id2label = dict(enumerate(FASHION_MNIST_CLASSES))
    teacher.config.label2id = {name: i for i, name in enumerate(FASHION_MNIST_CLASSES)}
    teacher.save_pretrained(workdir / "teacher")
    recipe = Path(__file__).resolve().parent.parent / "training" / "recipes" / "fashion_mnist_cpu.json"
    base = [
        str(recipe),
        "--teacher", str(workdir / "teacher"),
        "--output_dir", str(workdir / "run"),
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    # A small warm-up run first, so imports and the dataset's first load are not timed.
    cache_teacher(
        [*base, "--teacher_cache", str(workdir / "warm"), "--max_train_samples", "256", "--cache_epochs", "1"]
    )
    argv = [*base, "--teacher_cache", str(workdir / "cache"), "--cache_epochs", str(args.epochs)]
    start = time.perf_counter()
    cache_teacher(argv)
    seconds = time.perf_counter() - start
    cache = TeacherCache(workdir / "cache")
    views = cache.metadata["storage"]["views_per_epoch"] * cache.epochs
    size = sum(path.stat().st_size for path in (workdir / "cache" / DATA_DIR).rglob("*.parquet"))
    print(
        f"cache-teacher, demo recipe, {torch.get_num_threads()} thread(s): {views} views in {seconds:.1f} s = "
        f"{views / seconds:.0f} views/s (start-up included); {size / views:.1f} bytes per view on disk (K=10=all)"
    )


def bench_size(args: argparse.Namespace, workdir: Path) -> None:
    print(
        "| classes | K | dtype | bytes per view (per image per epoch) | ImageNet-1k epoch (1,281,167 images) |"
    )
    print("|---|---|---|---|---|")
    for num_classes, top_k, dtype in [
        (1000, 10, "float16"),
        (1000, 1000, "float16"),
        (1000, 1000, "float32"),
        (10, 10, "float16"),
    ]:
        folder = write_synthetic_cache(
            workdir / f"size-{num_classes}-{top_k}-{dtype}", args.views, num_classes, top_k, dtype
        )
        size = sum(path.stat().st_size for path in (folder / DATA_DIR).rglob("*.parquet"))
        per_view = size / args.views
        print(
            f"| {num_classes} | {top_k} | {dtype} | {per_view:.1f} B | {per_view * 1_281_167 / 1e9:.2f} GB |"
        )


def bench_lookup(args: argparse.Namespace, workdir: Path) -> None:
    """Per-step cost and memory of `TeacherCache.teacher_logits` for one process of `--processes`."""
    import resource

    processes, per_device = args.processes, args.per_device
    global_batch = processes * per_device
    rank = processes // 2
    print(
        "| classes | K | views in the cache | process | steps timed | per step: mean | median | max | "
        "held (2 windows) | peak RSS growth |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for top_k, views in ((10, args.lookup_views), (1000, args.lookup_views_all)):
        views -= views % global_batch
        began = time.perf_counter()
        folder = write_imagenet_sized_cache(
            workdir / f"lookup-{top_k}", views, 1000, top_k, processes, per_device
        )
        written = time.perf_counter() - began
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cache = TeacherCache(folder)
        steps = min(args.lookup_steps, views // global_batch)
        times, held = [], 0
        for step in range(steps):
            positions = step * global_batch + rank * per_device + np.arange(per_device)
            keys = torch.from_numpy(
                np.stack(
                    [np.zeros_like(positions), np.zeros_like(positions), np.full_like(positions, step),
                     positions, np.zeros_like(positions), positions],
                    axis=1,
                )
            )  # fmt: skip
            start = time.perf_counter()
            cache.teacher_logits(keys, hard=args.hard)
            times.append(time.perf_counter() - start)
            held = max(held, cache.held_bytes)
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        print(
            f"| 1000 | {top_k} | {views:,} | {rank} of {processes}, batch {per_device} | {steps} | "
            f"{1e3 * statistics.mean(times):.3f} ms | {1e3 * statistics.median(times):.3f} ms | "
            f"{1e3 * max(times):.1f} ms | {held / 2**20:.0f} MiB | {rss:.0f} MiB |",
            flush=True,
        )
        print(f"  (cache written in {written:.0f} s, {cache.window_rows} rows a window)", file=sys.stderr)
        if cache._reader is not None:
            cache._reader.shutdown(wait=True)
        del cache


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["steps", "precompute", "size", "lookup"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="'cpu' needs --threads 1.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per mode per repeat.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="Batch of the 224-px rows.")
    parser.add_argument("--rows", default="all", help="Comma-separated row numbers (0 demo, 1 Ti, 2 S).")
    parser.add_argument("--epochs", type=int, default=1, help="precompute: epochs to cache.")
    parser.add_argument("--views", type=int, default=4096, help="size: views per synthetic cache.")
    parser.add_argument(
        "--processes", type=int, default=8, help="lookup: processes the cache is laid out for."
    )
    parser.add_argument("--per-device", type=int, default=128, help="lookup: per-process batch.")
    parser.add_argument("--lookup-views", type=int, default=1_281_167, help="lookup: views at K = 10.")
    parser.add_argument("--lookup-views-all", type=int, default=131_072, help="lookup: views at K = all.")
    parser.add_argument("--lookup-steps", type=int, default=400, help="lookup: steps timed.")
    parser.add_argument("--hard", action="store_true", help="lookup: hard targets (one-hot of the top-1).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        parts = {
            "steps": bench_steps,
            "precompute": bench_precompute,
            "size": bench_size,
            "lookup": bench_lookup,
        }
        parts[args.part](args, Path(workdir))


if __name__ == "__main__":
    main()
