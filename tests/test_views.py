"""Deterministic training views: augmentation, sampling and Mixup/CutMix depend on (seed, epoch, index/batch)
only, never on the number of processes or data-loader workers or on the global random state."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader
from transformers import DeiTImageProcessor

from deit_distill.training.collator import DistillationCollator
from deit_distill.training.sampler import ViewSampler
from deit_distill.training.transforms import build_train_transform, with_image_transform
from deit_distill.training.views import (
    SeededViews,
    ViewCollator,
    ViewKey,
    mix_generator,
    seeded_global_rngs,
    view_seed,
)

NUM_CLASSES = 5
ROOT = Path(__file__).resolve().parent.parent


def smoothed_one_hot(labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    return (
        torch.nn.functional.one_hot(labels, NUM_CLASSES).double() * (1 - smoothing) + smoothing / NUM_CLASSES
    )


def examples(n: int, seed: int = 0, size: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.rand(3, size, size, generator=g),
            "labels": int(torch.randint(0, NUM_CLASSES, (1,), generator=g)),
        }
        for _ in range(n)
    ]


def keys(n: int, batch: int = 0, epoch: int = 0, seed: int = 0) -> list[ViewKey]:
    return [ViewKey(seed, epoch, batch, index) for index in range(n)]


def stacked(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i["pixel_values"] for i in items]), torch.tensor([i["labels"] for i in items])


# ---------------------------------------------------------------- Mixup / CutMix


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_mixup_mixes_neighbours_with_the_lambda_drawn_from_the_batch_key(n):
    collator = DistillationCollator(NUM_CLASSES, mixup_alpha=1.0, label_smoothing=0.1)
    items = examples(n)
    images, labels = stacked(items)
    batch = collator(items, views=keys(n, batch=3))
    lam, box = collator.mix_params(mix_generator(ViewKey(0, 0, 3, 0)), (8, 8))
    assert box is None and 0 < lam < 1

    # Example 2k is mixed with 2k+1 and vice versa; the last of an odd batch stays as it is.
    partner = [i ^ 1 if i ^ 1 < n else i for i in range(n)]
    expected = lam * images.double() + (1 - lam) * images[partner].double()
    torch.testing.assert_close(batch["pixel_values"].double(), expected, atol=1e-6, rtol=0)
    targets = lam * smoothed_one_hot(labels) + (1 - lam) * smoothed_one_hot(labels[partner])
    torch.testing.assert_close(batch["labels"].double(), targets, atol=1e-6, rtol=0)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (n, NUM_CLASSES)


def test_cutmix_pastes_the_neighbours_box_and_weights_targets_by_its_area():
    collator = DistillationCollator(NUM_CLASSES, cutmix_alpha=1.0, label_smoothing=0.1)
    items = examples(6, size=16)
    images, labels = stacked(items)
    for batch_index in range(20):  # find a batch whose box is neither empty nor the whole image
        lam, box = collator.mix_params(mix_generator(ViewKey(0, 0, batch_index, 0)), (16, 16))
        if 0 < lam < 1:
            break
    batch = collator(items, views=keys(6, batch=batch_index))
    y0, y1, x0, x1 = box
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    expected = torch.where(inside, images[partner], images)
    assert torch.equal(batch["pixel_values"], expected)
    # timm's `correct_lam`: the label weight is the share of the image that was not pasted over.
    assert lam == pytest.approx(1 - inside.double().mean().item())
    targets = lam * smoothed_one_hot(labels) + (1 - lam) * smoothed_one_hot(labels[partner])
    torch.testing.assert_close(batch["labels"].double(), targets, atol=1e-6, rtol=0)


def test_mixing_draws_follow_timms_recipe_in_distribution():
    collator = DistillationCollator(NUM_CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.9, switch_prob=0.5)
    draws = [collator.mix_params(mix_generator(ViewKey(1, 0, b, 0)), (32, 32)) for b in range(4000)]
    unmixed = np.mean([lam == 1.0 and box is None for lam, box in draws])
    cutmix = np.mean([box is not None for _, box in draws])
    assert unmixed == pytest.approx(0.1, abs=0.02)
    assert cutmix == pytest.approx(0.45, abs=0.03)
    # Beta(0.8, 0.8) for Mixup is symmetric around 0.5.
    mixup_lams = [lam for lam, box in draws if box is None and lam != 1.0]
    assert np.mean(mixup_lams) == pytest.approx(0.5, abs=0.03)


def test_a_global_batch_split_over_processes_mixes_exactly_as_in_one_process():
    collator = DistillationCollator(NUM_CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    for batch_index in range(8):  # Mixup and CutMix batches both
        items, views = examples(8, seed=batch_index), keys(8, batch=batch_index)
        whole = collator([dict(i) for i in items], views=views)
        halves = [collator(items[s : s + 4], views=views[s : s + 4]) for s in (0, 4)]
        for name in ("pixel_values", "labels"):
            assert torch.equal(whole[name], torch.cat([h[name] for h in halves])), (batch_index, name)


def test_mixing_depends_on_the_key_not_on_global_random_state():
    collator = DistillationCollator(NUM_CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0)
    first = collator(examples(4), views=keys(4, batch=2))
    np.random.seed(123)
    torch.manual_seed(123)
    again = collator(examples(4), views=keys(4, batch=2))
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    other_epoch = collator(examples(4), views=keys(4, batch=2, epoch=1))
    assert not torch.equal(first["labels"], other_epoch["labels"])


def test_mixing_without_view_keys_says_how_to_get_them():
    with pytest.raises(ValueError, match="ViewKey"):
        DistillationCollator(NUM_CLASSES, mixup_alpha=0.8)(examples(2))


def test_bad_mixing_settings_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        DistillationCollator(cutmix_alpha=1.0)
    with pytest.raises(ValueError, match="prob"):
        DistillationCollator(NUM_CLASSES, mixup_alpha=0.8, prob=1.5)


# ---------------------------------------------------------------- sampler


def dealt(sampler: ViewSampler, per_device_batch: int, num_processes: int) -> list[list[ViewKey]]:
    """The global batches the processes see, step by step, after accelerate deals the sampler's batches out."""
    shards = [
        list(BatchSamplerShard(BatchSampler(sampler, per_device_batch, drop_last=False), num_processes, rank))
        for rank in range(num_processes)
    ]
    return [[key for shard in shards for key in shard[step]] for step in range(len(shards[0]))]


@pytest.mark.parametrize("num_repeats", [1, 3])
def test_every_process_count_sees_the_same_global_batches(num_repeats):
    global_batch = 24
    sampler = ViewSampler(range(240), global_batch_size=global_batch, num_repeats=num_repeats, seed=4)
    sampler.set_epoch(3)
    one = dealt(sampler, global_batch, 1)
    assert all(
        key.batch == step and key.epoch == 3 and key.seed == 4 for step, b in enumerate(one) for key in b
    )
    for num_processes in (2, 3, 4):
        assert dealt(sampler, global_batch // num_processes, num_processes) == one


def test_without_repetition_an_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    sampler = ViewSampler(range(50), global_batch_size=8, seed=1)
    order = [key.index for key in sampler]
    assert sorted(order) == list(range(50)) and len(sampler) == 50
    assert [key.index for key in sampler] == order
    sampler.set_epoch(1)
    assert [key.index for key in sampler] != order
    assert [key.index for key in ViewSampler(range(50), global_batch_size=8, seed=2)] != order


def test_repeated_copies_are_distinct_views_in_the_same_global_batch():
    sampler = ViewSampler(range(100), global_batch_size=12, num_repeats=3, seed=0)
    views = list(sampler)
    assert len(views) == len(sampler) == 96  # about one pass over the data, cut to whole global batches
    assert len(set(views)) == len(views)  # every copy is its own view
    for index in {key.index for key in views}:
        copies = [key for key in views if key.index == index]
        # All copies of an image, except those cut off at the end of the epoch, share a global batch.
        if len(copies) == 3:
            assert len({key.batch for key in copies}) == 1
            assert sorted(key.repeat for key in copies) == [0, 1, 2]
    # Copies are spread over their batch, so neighbours (the Mixup/CutMix pairs) are rarely the same image.
    same_pairs = sum(views[i].index == views[i + 1].index for i in range(0, len(views), 2))
    assert same_pairs < len(views) // 2 * 0.3


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match=">= 1"):
        ViewSampler(range(10), global_batch_size=0)
    with pytest.raises(ValueError, match="at least one global batch"):
        ViewSampler(range(10), global_batch_size=16, num_repeats=3)


# ---------------------------------------------------------------- seeded views


@pytest.fixture(scope="module")
def deit_views() -> SeededViews:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(16)]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": [i % NUM_CLASSES for i in range(16)]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=NUM_CLASSES)}
        ),
    )
    processor = DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32})
    return SeededViews(with_image_transform(dataset, build_train_transform(processor, "deit")))


def test_a_view_is_a_pure_function_of_its_key(deit_views):
    key = ViewKey(seed=0, epoch=2, batch=0, index=5, repeat=1)
    first = deit_views[key]["pixel_values"]
    for other in (key._replace(epoch=3), key._replace(repeat=0), key._replace(seed=1)):
        assert not torch.equal(deit_views[other]["pixel_values"], first)
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    # The batch a view falls in does not change it: only (seed, epoch, index, repeat) do.
    assert torch.equal(deit_views[key._replace(batch=7)]["pixel_values"], first)
    assert deit_views[key]["view"] == key


def test_drawing_a_view_leaves_torchs_global_random_state_as_it_was(deit_views):
    # torch's generator drives dropout and drop path in the main process.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    deit_views[ViewKey(0, 0, 0, 3)]
    assert torch.equal(torch.rand(3), expected)


def test_view_seeds_are_stable_across_processes_and_distinct_per_view():
    # The seed may not depend on Python's per-process hash salt: a fresh interpreter computes the same one.
    code = (
        "from deit_distill.training.views import ViewKey, view_seed; print(view_seed(ViewKey(4, 2, 0, 7, 1)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert int(done.stdout) == view_seed(ViewKey(4, 2, 9, 7, 1))
    assert len({view_seed(ViewKey(0, e, 0, i)) for e in range(10) for i in range(100)}) == 1000
    with seeded_global_rngs(view_seed(ViewKey(0, 0, 0, 0))):
        a = torch.rand(2)
    with seeded_global_rngs(view_seed(ViewKey(0, 0, 0, 0))):
        assert torch.equal(torch.rand(2), a)


def test_any_number_of_workers_gives_the_same_batches(deit_views):
    collator = ViewCollator(
        DistillationCollator(NUM_CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    )
    sampler = ViewSampler(deit_views, global_batch_size=4, num_repeats=1, seed=3)
    sampler.set_epoch(1)
    runs = []
    for workers in (0, 1, 2):
        loader = DataLoader(
            deit_views, batch_size=4, sampler=sampler, collate_fn=collator, num_workers=workers
        )
        runs.append(list(loader))
    for batches in runs[1:]:
        for batch, reference in zip(batches, runs[0], strict=True):
            assert torch.equal(batch["pixel_values"], reference["pixel_values"])
            assert torch.equal(batch["labels"], reference["labels"])
    assert set(runs[0][0]) == {"pixel_values", "labels"}  # the view keys do not reach the model


@pytest.mark.slow
def test_training_with_0_1_or_2_workers_logs_the_same_losses(tmp_path):
    from deit_distill.training.commands.train import main

    run = [
        "--config_overrides", "patch_size=7,hidden_size=24,num_hidden_layers=1,num_attention_heads=2",
        "--distillation_type", "none",
        "--max_train_samples", "48",
        "--max_eval_samples", "16",
        "--image_size", "28",
        "--crop_pct", "1.0",
        "--augmentation", "deit",
        "--mixup", "0.8",
        "--cutmix", "1.0",
        "--per_device_train_batch_size", "16",
        "--max_steps", "4",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--seed", "0",
        "--use_cpu", "true",
        "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    losses = []
    for workers in (0, 1, 2):
        output_dir = tmp_path / f"workers{workers}"
        main([*run, "--dataloader_num_workers", str(workers), "--output_dir", str(output_dir)])
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        losses.append([entry["loss"] for entry in history if "loss" in entry])
    assert len(losses[0]) == 4
    assert losses[1] == losses[0] and losses[2] == losses[0]
