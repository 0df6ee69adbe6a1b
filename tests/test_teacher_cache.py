"""The teacher cache: `cache-teacher` runs the teacher once over every training view, and `train --teacher_cache`
replays the run with the live teacher exactly (same pixels, same teacher distribution, same losses), refuses a
cache written for other views or another teacher (naming the field), and a killed `cache-teacher` finishes on a
rerun with the contents of an uninterrupted one.

The runs use the full DeiT recipe (RandomResizedCrop, RandAugment, random erasing, Mixup/CutMix) with 2
data-loader workers, and a teacher with its own normalisation (adapted on the fly), on 64 Fashion-MNIST images in
batches of 16: 4 steps per epoch, so 6 steps cross an epoch boundary.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from hub_server import DEFAULT_TOKEN
from processes import kill_when_stalled, run_offline
from safetensors.torch import load_file, save_file
from test_distributed import free_port, save_teacher
from test_resume import logged_losses
from torch.utils.data import DataLoader

from deit_distill.training.collator import DistillationCollator
from deit_distill.training.commands.cache_teacher import main as cache_teacher
from deit_distill.training.commands.cli import main as cli
from deit_distill.training.commands.train import main as train
from deit_distill.training.errors import UserError
from deit_distill.training.losses import DistillationLoss
from deit_distill.training.sampler import ViewSampler
from deit_distill.training.teacher_cache import (
    DATA_DIR,
    METADATA_FILE,
    TeacherCache,
    expand_top_k,
    read_metadata,
)
from deit_distill.training.trainer import DistillationTrainer
from deit_distill.training.views import VIEW_KEYS, SeededViews, ViewCollator, ViewKey

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS, CACHED_EPOCHS = 6, 2
RUN = [
    "--config_overrides", "patch_size=7,hidden_size=24,num_hidden_layers=1,num_attention_heads=2",
    "--drop_path_rate", "0.0",
    "--distillation_type", "soft",
    "--tau", "2.0",
    "--max_train_samples", "64",
    "--max_eval_samples", "16",
    "--image_size", "28",
    "--crop_pct", "1.0",
    "--image_mean", "0.286,0.286,0.286",
    "--image_std", "0.353,0.353,0.353",
    "--augmentation", "deit",
    "--mixup", "0.8",
    "--cutmix", "1.0",
    "--dataloader_num_workers", "2",
    "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "16",
    "--max_steps", str(MAX_STEPS),
    "--save_strategy", "no",
    "--logging_steps", "1",
    "--learning_rate", "0.001",
    "--seed", "0",
    "--use_cpu", "true",
    "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip
# One shard per data-loader step, so a kill leaves whole shards behind and a partial epoch.
FULL = ["--cache_top_k", "0", "--cache_dtype", "float32", "--cache_shard_views", "16"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    save_teacher(path)
    return path


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, teacher) -> Path:
    """Every class, float32: a cache that must reproduce the live teacher."""
    path = tmp_path_factory.mktemp("cache") / "full"
    cache_teacher([*RUN, "--teacher", str(teacher), "--teacher_cache", str(path), *FULL])
    return path


class Recorder:
    """Records, per training step, the pixels the student trained on, the keys of their views and the teacher's
    distribution the loss used (from the live teacher or from the cache)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pixels, self.keys, self.teacher = [], [], []
        compute_loss, loss_forward = DistillationTrainer.compute_loss, DistillationLoss.forward
        recorder = self

        def record_step(trainer, model, inputs, *args, **kwargs):
            if model.training:
                recorder.pixels.append(inputs["pixel_values"].clone())
                recorder.keys.append(inputs[VIEW_KEYS].clone())
            return compute_loss(trainer, model, inputs, *args, **kwargs)

        def record_loss(loss, outputs, labels, teacher_logits=None):
            if outputs.logits.requires_grad:  # training steps only
                recorder.teacher.append(torch.log_softmax(teacher_logits.float(), -1).detach())
            return loss_forward(loss, outputs, labels, teacher_logits)

        monkeypatch.setattr(DistillationTrainer, "keep_view_keys", True)  # the live run's keys too
        monkeypatch.setattr(DistillationTrainer, "compute_loss", record_step)
        monkeypatch.setattr(DistillationLoss, "forward", record_loss)


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, teacher):
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorded = Recorder(monkeypatch)
        output_dir = tmp_path_factory.mktemp("live") / "run"
        train([*RUN, "--teacher", str(teacher), "--output_dir", str(output_dir)])
    return output_dir, recorded


def cache_contents(path: Path) -> pa.Table:
    files = sorted((path / DATA_DIR).glob("*/*/*.parquet"))
    return pa.concat_tables([pq.read_table(file) for file in files]).sort_by(
        [("epoch", "ascending"), ("position", "ascending")]
    )


# ---------------------------------------------------------------- exactness


def test_training_from_a_full_cache_replays_the_live_run_exactly(live_run, full_cache, tmp_path, monkeypatch):
    live_dir, live = live_run
    recorded = Recorder(monkeypatch)
    cached_dir = tmp_path / "cached"
    # No --teacher: nothing but the cache stands for it.
    train([*RUN, "--teacher_cache", str(full_cache), "--output_dir", str(cached_dir)])

    assert len(recorded.pixels) == len(live.pixels) == MAX_STEPS
    for step in range(MAX_STEPS):
        assert torch.equal(recorded.pixels[step], live.pixels[step]), step
        assert torch.equal(recorded.keys[step], live.keys[step]), step
        torch.testing.assert_close(recorded.teacher[step], live.teacher[step], rtol=1e-5, atol=1e-5)
    cached_losses, live_losses = logged_losses(cached_dir), logged_losses(live_dir)
    assert sorted(cached_losses) == sorted(live_losses) == list(range(1, MAX_STEPS + 1))
    for step, loss in live_losses.items():
        assert cached_losses[step] == pytest.approx(loss, rel=1e-5), step


def test_with_the_default_top_k_hard_distillation_gets_the_live_teachers_targets(live_run, teacher, tmp_path):
    _, live = live_run
    cache_dir = tmp_path / "top3"
    cache_teacher([*RUN, "--teacher", str(teacher), "--teacher_cache", str(cache_dir), "--cache_top_k", "3"])
    cache = TeacherCache(cache_dir)
    assert cache.top_k == 3 and read_metadata(cache_dir)["storage"]["dtype"] == "float16"
    for keys, live_log_probs in zip(live.keys, live.teacher, strict=True):
        hard = cache.teacher_logits(keys, hard=True)
        assert torch.equal(hard.argmax(-1), live_log_probs.argmax(-1))
        # The soft targets keep the top 3 (to float16 precision) and share the rest of the mass evenly.
        soft = cache.teacher_logits(keys).exp()
        top = live_log_probs.exp().topk(3, dim=-1)
        torch.testing.assert_close(soft.gather(-1, top.indices), top.values, rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(soft.sum(-1), torch.ones(len(keys)), rtol=0, atol=2e-3)


def test_expand_top_k_spreads_the_remaining_mass_over_the_other_classes():
    log_probs = torch.log_softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(0)), -1)
    values, indices = log_probs.topk(3, -1)
    expanded = expand_top_k(indices, values, 7).exp().numpy()
    probs = log_probs.exp().numpy()
    for row in range(4):  # reference: a loop over the classes
        kept = set(indices[row].tolist())
        rest = (1 - sum(probs[row, c] for c in kept)) / 4
        for c in range(7):
            assert expanded[row, c] == pytest.approx(probs[row, c] if c in kept else rest, rel=1e-5)
    # Every class stored: the distribution itself.
    values, indices = log_probs.topk(7, -1)
    torch.testing.assert_close(expand_top_k(indices, values, 7), log_probs)


def test_view_keys_carry_each_views_position_in_the_epochs_global_order():
    sampler = ViewSampler(range(40), global_batch_size=8, num_repeats=2, seed=1)
    sampler.set_epoch(3)
    keys = list(sampler)
    assert [key.position for key in keys] == list(range(len(keys)))
    assert all(key.batch == key.position // 8 and key.epoch == 3 for key in keys)
    # With a cycle of 2 epochs, epoch 3 draws the views of epoch 1.
    cycled = ViewSampler(range(40), global_batch_size=8, num_repeats=2, seed=1, num_distinct_epochs=2)
    cycled.set_epoch(3)
    sampler.set_epoch(1)
    assert list(cycled) == list(sampler)


def test_the_collator_hands_the_keys_on_only_when_asked():
    views = SeededViews([{"pixel_values": torch.rand(3, 4, 4), "labels": i % 3} for i in range(6)])
    sampler = ViewSampler(views, global_batch_size=6, seed=0)
    collate = DistillationCollator(3, mixup_alpha=1.0)
    plain = next(iter(DataLoader(views, batch_size=6, sampler=sampler, collate_fn=ViewCollator(collate))))
    keyed = next(
        iter(
            DataLoader(views, batch_size=6, sampler=sampler, collate_fn=ViewCollator(collate, keep_keys=True))
        )
    )
    assert set(plain) == {"pixel_values", "labels"}
    assert [ViewKey(*row) for row in keyed[VIEW_KEYS].tolist()] == list(sampler)
    assert torch.equal(keyed["pixel_values"], plain["pixel_values"])


# ---------------------------------------------------------------- safety


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (["--seed", "1"], "views.seed"),
        (["--augmentation", "light"], "views.augmentation"),
        (["--mixup", "0.5"], "views.mixup"),
        (["--per_device_train_batch_size", "8"], "layout.global_batch_size"),
    ],
)
def test_a_run_whose_views_differ_from_the_cache_is_refused_naming_the_field(
    full_cache, tmp_path, change, field
):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        train([*RUN, "--teacher_cache", str(full_cache), "--output_dir", str(tmp_path / "run"), *change])


def test_a_teacher_with_other_weights_is_refused(full_cache, tmp_path):
    other = tmp_path / "other_teacher"
    save_teacher(other)
    weights = other / "model.safetensors"
    state = load_file(weights)
    name = next(name for name, value in state.items() if value.is_floating_point())
    state[name] = state[name] + 0.01
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"teacher\.weights_sha256"):
        train(
            [
                *RUN,
                "--teacher",
                str(other),
                "--teacher_cache",
                str(full_cache),
                "--output_dir",
                str(tmp_path / "r"),
            ]
        )


def test_more_epochs_than_cached_is_refused_unless_cycling(full_cache, tmp_path):
    longer = [*RUN, "--max_steps", "10", "--teacher_cache", str(full_cache), "--logging_steps", "5"]
    with pytest.raises(UserError, match=f"holds {CACHED_EPOCHS} epoch.*draws 3.*--cache_cycle true"):
        train([*longer, "--output_dir", str(tmp_path / "refused")])
    train([*longer, "--output_dir", str(tmp_path / "cycled"), "--cache_cycle", "true"])
    assert sorted(logged_losses(tmp_path / "cycled")) == [5, 10]


def test_cache_teacher_on_the_command_line_needs_a_teacher_and_a_folder(tmp_path, capsys):
    assert cli(["cache-teacher", *RUN, "--teacher_cache", str(tmp_path / "cache")]) == 2
    assert "cache-teacher needs --teacher" in capsys.readouterr().err
    assert cli(["cache-teacher", *RUN, "--teacher", str(tmp_path)]) == 2
    assert "needs --teacher_cache DIR" in capsys.readouterr().err


def test_an_incomplete_or_missing_cache_is_refused(full_cache, tmp_path):
    with pytest.raises(UserError, match=r"no teacher_cache\.json"):
        TeacherCache(tmp_path)
    metadata = (full_cache / METADATA_FILE).read_text()
    (tmp_path / METADATA_FILE).write_text(metadata.replace('"complete": true', '"complete": false'))
    with pytest.raises(UserError, match=r"incomplete.*rerun"):
        TeacherCache(tmp_path)


# ---------------------------------------------------------------- kill and resume

# Runs cache-teacher's `main`, but stalls in the teacher's forward pass of its KILL_AT-th batch (epoch 1, step 1:
# epoch 0 and one shard of epoch 1 are written). There the parent kills it.
KILLABLE_CACHE = textwrap.dedent(
    """
    import sys, time
    from deit_distill.training.trainer import DistillationTrainer
    from deit_distill.training.commands.cache_teacher import main

    marker, kill_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    teacher_logits, calls = DistillationTrainer.teacher_logits, []

    def stall(self, pixel_values):
        calls.append(1)
        if len(calls) == kill_at:
            open(marker, "w").write("stalled")
            time.sleep(600)
        return teacher_logits(self, pixel_values)

    DistillationTrainer.teacher_logits = stall
    main(argv)
    """
)


def test_a_killed_cache_teacher_finishes_on_a_rerun_with_the_uninterrupted_contents(
    full_cache, teacher, tmp_path
):
    cache_dir, marker = tmp_path / "cache", tmp_path / "stalled"
    argv = [*RUN, "--teacher", str(teacher), "--teacher_cache", str(cache_dir), *FULL]
    kill_when_stalled(
        [sys.executable, "-c", KILLABLE_CACHE, str(marker), "6", *argv], marker, "cache-teacher"
    )

    shards = sorted(path.relative_to(cache_dir) for path in cache_dir.glob(f"{DATA_DIR}/*/*/*.parquet"))
    assert len(shards) == 5  # 4 steps of epoch 0, 1 of epoch 1
    assert not read_metadata(cache_dir)["complete"]
    with pytest.raises(UserError, match="incomplete"):
        train([*RUN, "--teacher_cache", str(cache_dir), "--output_dir", str(tmp_path / "run")])

    cache_teacher(argv)
    finished = sorted(path.relative_to(cache_dir) for path in cache_dir.glob(f"{DATA_DIR}/*/*/*.parquet"))
    assert finished == sorted(
        path.relative_to(full_cache) for path in full_cache.glob(f"{DATA_DIR}/*/*/*.parquet")
    )
    assert cache_contents(cache_dir).equals(cache_contents(full_cache))
    assert read_metadata(cache_dir) == read_metadata(full_cache)


# ---------------------------------------------------------------- format and Hub


def test_the_cache_is_parquet_that_datasets_reads(full_cache):
    metadata = read_metadata(full_cache)
    assert metadata["complete"] and metadata["storage"]["views_per_epoch"] == 64
    views = datasets.load_dataset(
        "parquet", data_files=str(full_cache / DATA_DIR / "*/*/*.parquet"), split="train"
    )
    assert len(views) == CACHED_EPOCHS * 64
    row = views[0]
    assert len(row["topk_indices"]) == len(row["topk_log_probs"]) == 10
    assert np.exp(row["topk_log_probs"]).sum() == pytest.approx(1.0, abs=1e-5)


PUSH_AND_READ = """
import json, pathlib
from huggingface_hub import DatasetCard, snapshot_download
from deit_distill.training.commands.cli import main
from deit_distill.training.teacher_cache import TeacherCache
assert main(["push-cache", PARAMS["cache"], "--repo_id", PARAMS["repo"]]) == 0
local = snapshot_download(PARAMS["repo"], repo_type="dataset")
cache = TeacherCache(local)
keys = PARAMS["keys"]
import torch
print(json.dumps({
    "files": sorted(str(p.relative_to(local)) for p in pathlib.Path(local).rglob("*") if p.is_file()),
    "tags": DatasetCard.load(PARAMS["repo"], repo_type="dataset").data.tags,
    "logits": cache.teacher_logits(torch.tensor(keys)).tolist(),
    "snapshot": local,
}))
"""


def test_push_cache_uploads_a_dataset_repo_that_trains_like_the_local_cache(full_cache, hub_client, tmp_path):
    keys = [list(ViewKey(0, 1, 0, index=0, position=p)) for p in range(2)]
    local = TeacherCache(full_cache)
    contents = cache_contents(full_cache)
    epoch_1 = contents.filter(pc.equal(contents["epoch"], 1))
    for row, p in zip(keys, range(2), strict=True):
        row[3], row[4] = epoch_1["index"][p].as_py(), epoch_1["repeat"][p].as_py()
    result = hub_client(
        PUSH_AND_READ,
        {"cache": str(full_cache), "repo": "test-user/teacher-cache", "keys": keys},
        token=DEFAULT_TOKEN,
    )
    assert METADATA_FILE in result["files"] and "README.md" in result["files"]
    assert sum(name.endswith(".parquet") for name in result["files"]) == 8
    assert "teacher-cache" in result["tags"]
    torch.testing.assert_close(torch.tensor(result["logits"]), local.teacher_logits(torch.tensor(keys)))
    # Train 2 steps from the downloaded repo and from the local cache: the same losses.
    short = [*RUN, "--max_steps", "2"]
    train([*short, "--teacher_cache", result["snapshot"], "--output_dir", str(tmp_path / "from_hub")])
    train([*short, "--teacher_cache", str(full_cache), "--output_dir", str(tmp_path / "from_local")])
    hub_losses, local_losses = logged_losses(tmp_path / "from_hub"), logged_losses(tmp_path / "from_local")
    assert sorted(hub_losses) == [1, 2] and hub_losses == local_losses


@pytest.mark.slow
def test_two_processes_under_accelerate_write_their_own_shards_with_the_one_process_contents(
    teacher, tmp_path
):
    # 2 processes x 8 per device and 1 process x 16: the same global batches, so the same views and outputs.
    run = [*RUN, "--dataloader_num_workers", "0", "--teacher", str(teacher), *FULL]
    two, one = tmp_path / "two", tmp_path / "one"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "training" / "accelerate_configs" / "cpu_ddp.yaml"),
        "--main_process_port", str(free_port()),
        "-m", "deit_distill.training.commands.cache_teacher",
        *run, "--per_device_train_batch_size", "8", "--teacher_cache", str(two), "--output_dir", str(tmp_path / "o2"),
    ]  # fmt: skip
    done = run_offline(command)
    assert done.returncode == 0, done.stderr[-4000:]
    cache_teacher([*run, "--teacher_cache", str(one), "--output_dir", str(tmp_path / "o1")])

    assert {path.parent.name for path in two.glob(f"{DATA_DIR}/*/*/*.parquet")} == {
        "process-00000-of-00002",
        "process-00001-of-00002",
    }
    assert read_metadata(two)["complete"]
    assert cache_contents(two).equals(cache_contents(one))
    # The cache of two processes trains a one-process run.
    train([*run, "--teacher_cache", str(two), "--output_dir", str(tmp_path / "run")])
    assert len(logged_losses(tmp_path / "run")) == MAX_STEPS


# ---------------------------------------------------------------- the reader at scale: own rows, bounded memory

SEED, CLASSES, TOP_K = 7, 12, 3


def write_synthetic_cache(folder: Path, *, epochs: int, steps: int, writers: int, per_writer: int) -> dict:
    """A cache written by hand, as `writers` processes of `per_writer` views a step would write it: one shard
    per process and epoch, row groups of one step. Returns what every view's row holds, by (epoch, position)."""
    from deit_distill.training.teacher_cache import CACHE_FORMAT

    rng = np.random.default_rng(0)
    global_batch = writers * per_writer
    expected = {}
    for epoch in range(epochs):
        for process in range(writers):
            positions = np.array(
                [s * global_batch + process * per_writer + i for s in range(steps) for i in range(per_writer)]
            )
            index = rng.permutation(1000)[: len(positions)]
            logits = rng.normal(size=(len(positions), CLASSES))
            log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            ids = np.argsort(-log_probs, axis=1)[:, :TOP_K].astype(np.int16)
            values = np.take_along_axis(log_probs, ids.astype(np.int64), 1).astype(np.float16)
            for row, p in enumerate(positions):
                expected[epoch, int(p)] = (int(index[row]), ids[row], values[row])
            table = pa.table(
                {
                    "epoch": pa.array(np.full(len(positions), epoch), pa.int32()),
                    "position": pa.array(positions, pa.int64()),
                    "index": pa.array(index, pa.int64()),
                    "repeat": pa.array(np.zeros(len(positions)), pa.int16()),
                    "topk_indices": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), TOP_K),
                    "topk_log_probs": pa.FixedSizeListArray.from_arrays(
                        pa.array(values.reshape(-1), pa.float16()), TOP_K
                    ),
                }
            )
            shard = folder / DATA_DIR / f"epoch-{epoch:05d}" / f"process-{process:05d}-of-{writers:05d}"
            shard.mkdir(parents=True)
            pq.write_table(table, shard / f"steps-000000-{steps:06d}.parquet", row_group_size=per_writer)
    metadata = {
        "format": CACHE_FORMAT,
        "complete": True,
        "views": {"seed": SEED},
        "layout": {"global_batch_size": global_batch, "per_device_batch_size": per_writer},
        "storage": {"epochs": epochs, "top_k": TOP_K, "num_classes": CLASSES, "dtype": "float16"},
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata))
    return expected


def process_keys(expected: dict, epoch: int, step: int, global_batch: int, process: int, per_device: int):
    positions = [step * global_batch + process * per_device + i for i in range(per_device)]
    rows = [[SEED, epoch, step, expected[epoch, p][0], 0, p] for p in positions]
    return torch.tensor(rows), positions


def reference_log_probs(expected: dict, epoch: int, positions: list[int]) -> torch.Tensor:
    """TinyViT's rule by hand: the stored K, the rest of the mass spread evenly."""
    out = torch.empty(len(positions), CLASSES, dtype=torch.float64)
    for row, p in enumerate(positions):
        _, ids, values = expected[epoch, p]
        probs = np.exp(values.astype(np.float64))
        out[row] = (1 - probs.sum()) / (CLASSES - TOP_K)
        out[row, torch.from_numpy(ids.astype(np.int64))] = torch.from_numpy(probs)
    return out.log()


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_each_process_reads_only_the_row_groups_of_its_own_positions(tmp_path, monkeypatch, processes):
    # Written by 2 processes x 4 views a step (global batch 8); read by 1, 2 or 4 processes.
    expected = write_synthetic_cache(tmp_path, epochs=2, steps=40, writers=2, per_writer=4)
    per_device = 8 // processes
    read: list[tuple[str, int]] = []

    class RecordingParquetFile(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            self.writer = Path(source).parent.name

        def read_row_groups(self, row_groups, *args, **kwargs):
            read.extend((self.writer, group) for group in row_groups)
            return super().read_row_groups(row_groups, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", RecordingParquetFile)
    process = processes - 1  # the last process: its positions are the end of each global batch
    # A window of 5 steps of this process's rows at most (two held with the one read ahead).
    cache = TeacherCache(tmp_path, window_bytes=5 * per_device * (24 + TOP_K * 6))
    for epoch in (0, 1):
        for step in range(40):
            keys, positions = process_keys(expected, epoch, step, 8, process, per_device)
            logits = cache.teacher_logits(keys)
            assert logits.device.type == "cpu" and logits.dtype == torch.float32
            torch.testing.assert_close(
                logits.double(), reference_log_probs(expected, epoch, positions), rtol=1e-5, atol=1e-6
            )
            hard = cache.teacher_logits(keys, hard=True)
            assert hard.argmax(-1).tolist() == [int(expected[epoch, p][1][0]) for p in positions]
            assert cache.held_bytes <= 2 * cache.window_rows * cache._row_bytes
    cache._reader.shutdown(wait=True)
    # Writer process w holds offsets [4w, 4w + 4) of each global batch: with 2 or 4 readers the last one needs
    # writer 1's shards only; with one reader, both. Each row group (one step of one writer) is read once an
    # epoch, not once a step.
    writers = (
        ["process-00001-of-00002"] if processes > 1 else ["process-00000-of-00002", "process-00001-of-00002"]
    )
    assert Counter(read) == {(writer, group): 2 for writer in writers for group in range(40)}
