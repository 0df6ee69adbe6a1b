"""Start-up cost of `deit-distill train` on a folder of images, and what it grows with.

    python bench/startup.py --folders /tmp/imgs_20k /tmp/imgs_100k [--out docs/startup.json]
    python bench/startup.py --make_images /tmp/imgs_100k:100000 ...   # write synthetic JPEGs first (not in the repo)

For each folder, `deit-distill train` runs in a fresh process (a tiny student, no teacher, one process, CPU) with a
fresh datasets cache ("first start": the folder is listed and converted to Arrow) and again with that cache
("second start"); the run stops at its first training step. Every phase is timed from the process's own start:
imports, data (listing, Arrow conversion, split), model, trainer, first batch. Two sizes give per-image costs
(a straight line through both), extrapolated to ImageNet's 1,281,167 images.

`--hash` also times `dataset_sha256` (the teacher cache's dataset hash) against its previous row-by-row version
on the largest folder, in microseconds per row, and checks they give the same digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGENET_IMAGES = 1_281_167
# The child: train.py's `main` with each phase stamped (seconds since the process started) and an exit at the
# first training step.
CHILD = r"""
import os, sys, time, json
start = float(sys.argv[1]); argv = sys.argv[2:]
stamps = {}
def stamp(name): stamps[name] = time.time() - start
import deit_distill.training.commands.train as train
from deit_distill.training.trainer import DistillationTrainer
stamp("imports")
load, build = train.load_data_once, train.build_trainer
def timed_load(*a, **k):
    out = load(*a, **k); stamp("data"); return out
def timed_build(*a, **k):
    stamp("model"); out = build(*a, **k); stamp("trainer"); return out
def first_step(self, *a, **k):
    stamp("first step")
    print("STAMPS " + json.dumps(stamps), flush=True)
    os._exit(0)
train.load_data_once, train.build_trainer = timed_load, timed_build
DistillationTrainer.training_step = first_step
train.main(argv)
"""
RUN = [
    "--config_overrides", "patch_size=8,hidden_size=32,num_hidden_layers=1,num_attention_heads=2",
    "--image_size", "32", "--crop_pct", "1.0",
    "--distillation_type", "none",
    "--per_device_train_batch_size", "64", "--dataloader_num_workers", "0",
    "--max_steps", "1", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
    "--disable_tqdm", "true", "--seed", "0",
]  # fmt: skip


def make_images(folder: Path, count: int, classes: int = 100) -> None:
    """`count` small JPEGs (64x48) in `classes` sub-folders; 64 distinct images written over and over."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(64):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
        encoded.append(buffer.getvalue())
    for label in range(classes):
        (folder / f"class_{label:04d}").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"class_{index % classes:04d}" / f"img_{index:07d}.jpg").write_bytes(encoded[index % 64])


def start_once(folder: Path, cache: Path, output_dir: Path) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    argv = [
        *RUN,
        "--dataset_name",
        str(folder),
        "--output_dir",
        str(output_dir),
        "--overwrite_output_dir",
        "true",
    ]
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(started), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("STAMPS ")]
    if not lines:
        raise RuntimeError(f"no first step:\n{done.stderr[-4000:]}")
    return json.loads(lines[0][len("STAMPS ") :])


def phases(stamps: dict[str, float]) -> dict[str, float]:
    order = ["imports", "data", "model", "trainer", "first step"]
    previous, out = 0.0, {}
    for name in order:
        out[name] = stamps[name] - previous
        previous = stamps[name]
    out["total"] = stamps["first step"]
    return out


def old_dataset_sha256(dataset, num_images: int = 64) -> str:
    """The previous `dataset_sha256` (labels read row by row), kept here as the reference."""
    import datasets
    import numpy as np

    rows = dataset.select_columns(["image", "label"]).cast_column("image", datasets.Image(decode=False))
    digest = hashlib.sha256(f"{len(rows)};".encode())
    digest.update(np.asarray(rows["label"], dtype=np.int64).tobytes())
    sample = np.unique(np.linspace(0, len(rows) - 1, min(num_images, len(rows))).astype(int)).tolist()
    for image in rows[sample]["image"]:
        data = image.get("bytes")
        if data is None:
            data = Path(image["path"]).read_bytes()
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def hash_costs(folder: Path) -> dict[str, float]:
    from deit_distill.training.data import _list_folder, class_folders_dataset
    from deit_distill.training.teacher_cache import dataset_sha256

    dataset = class_folders_dataset(folder, _list_folder(folder))["train"]
    shuffled = dataset.shuffle(seed=0)  # with an indices mapping, as a split or subset makes it
    result = {"rows": len(dataset)}
    for name, rows in (("plain", dataset), ("indexed", shuffled)):
        timings = {}
        for label, function in (("before", old_dataset_sha256), ("after", dataset_sha256)):
            began = time.perf_counter()
            digest = function(rows)
            timings[label] = (time.perf_counter() - began) / len(rows) * 1e6
            timings[f"{label}_digest"] = digest
        assert timings["before_digest"] == timings["after_digest"], name
        result[f"{name}_us_per_row_before"] = timings["before"]
        result[f"{name}_us_per_row_after"] = timings["after"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--folders", type=Path, nargs="+", required=True, help="Image folders, smallest first."
    )
    parser.add_argument("--make_images", nargs="*", default=[], help="FOLDER:COUNT to write first.")
    parser.add_argument("--hash", action="store_true", help="Also time dataset_sha256 on the largest folder.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    for spec in args.make_images:
        folder, count = spec.rsplit(":", 1)
        if not Path(folder).is_dir():
            make_images(Path(folder), int(count))

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "starts": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        for folder in args.folders:
            count = sum(1 for _ in folder.glob("*/*"))
            cache = Path(scratch) / f"cache-{folder.name}"
            for which in ("first", "second"):
                stamps = start_once(folder, cache, Path(scratch) / "run")
                row = {"images": count, "start": which, **phases(stamps)}
                results["starts"].append(row)
                print(json.dumps(row), flush=True)
        for which in ("first", "second"):
            rows = [row for row in results["starts"] if row["start"] == which]
            if len(rows) >= 2:
                small, large = rows[0], rows[-1]
                per_image = (large["total"] - small["total"]) / (large["images"] - small["images"])
                fixed = small["total"] - per_image * small["images"]
                results[f"{which}_start_fit"] = {
                    "fixed_s": fixed,
                    "per_image_us": per_image * 1e6,
                    "data_per_image_us": (large["data"] - small["data"])
                    / (large["images"] - small["images"])
                    * 1e6,
                    "imagenet_s": fixed + per_image * IMAGENET_IMAGES,
                }
                print(which, json.dumps(results[f"{which}_start_fit"]), flush=True)
        if args.hash:
            results["dataset_sha256"] = hash_costs(args.folders[-1])
            print(json.dumps(results["dataset_sha256"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
