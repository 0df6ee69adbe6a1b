"""`--augment_on device` (deit_distill.training.device_augment) against timm's own PIL pipeline.

References: timm's op functions and `RandAugment`/`AugmentOp` objects (the ones `build_train_transform` uses), PIL's
resize for the crop, and independent counts for the statistics. Mean absolute differences of the resampling ops are
documented here (PyTorch's bicubic is a = -0.75 without antialias, PIL's a = -0.5 with).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

from deit_distill.training.collator import DistillationCollator
from deit_distill.training.device_augment import (
    COLOUR_OPS,
    GEOMETRIC_OPS,
    NO_OP,
    OPS,
    DecodeForDevice,
    augment_batch,
    crop_matrix,
    device_augment_spec,
    geometric_matrix,
    resample,
    stack_canvases,
)
from deit_distill.training.transforms import _posterize_keeping_zero_bits
from deit_distill.training.views import (
    AUGMENT_PARAMS,
    SeededViews,
    ViewKey,
    mix_generator,
    seeded_global_rngs,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Pearson chi-square critical values at p = 0.001 (scipy.stats.chi2.ppf(0.999, df)), for the two-sample tests.
CHI2_999 = {7: 24.32, 15: 37.70}


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth structure, edges and sensor noise, the full range of levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6, size=3)
    smooth = [
        128 + 110 * np.sin(x / (7 + 3 * c) + phase[c]) * np.cos(y / (5 + 2 * c) - phase[c]) for c in range(3)
    ]
    image = np.stack(smooth, -1) + rng.normal(0, 10, (height, width, 3))
    image[height // 3 : height // 2, width // 4 : width // 2] = rng.integers(
        0, 256, 3
    )  # a flat patch, an edge
    return np.clip(image, 0, 255).astype(np.uint8)


def as_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def timm_op(name: str, image: np.ndarray, arg: float) -> np.ndarray:
    pil = Image.fromarray(image)
    if name == "PosterizeIncreasing":
        return np.asarray(_posterize_keeping_zero_bits(pil, int(arg)))
    function = timm_aa.NAME_TO_OP[name]
    args = () if timm_aa.LEVEL_TO_ARG[name] is None else (arg,)
    return np.asarray(function(pil, *args))


COLOUR_ARGS = {
    "AutoContrast": [0.0],
    "Equalize": [0.0],
    "Invert": [0.0],
    "PosterizeIncreasing": [0, 1, 2, 3, 4],
    "SolarizeIncreasing": [0, 26, 128, 230, 256],
    "SolarizeAdd": [0, 55, 110],
    "ColorIncreasing": [0.1, 0.55, 1.0, 1.45, 1.9],
    "ContrastIncreasing": [0.1, 0.55, 1.45, 1.9],
    "BrightnessIncreasing": [0.1, 0.55, 1.45, 1.9],
    "SharpnessIncreasing": [0.1, 0.55, 1.45, 1.9],
}


@pytest.mark.parametrize("name", sorted(COLOUR_ARGS))
def test_colour_ops_equal_timms_pil_ops_within_one_level(name):
    images = [photo(40, 48, seed) for seed in range(3)]
    images.append(np.full((40, 48, 3), 77, np.uint8))  # a flat image: AutoContrast/Equalize leave it alone
    images.append((photo(40, 48, 5) // 4 + 60).astype(np.uint8))  # a narrow histogram
    for arg in COLOUR_ARGS[name]:
        batch = as_batch(images)
        args = torch.full((len(images),), float(arg))
        counted = torch.ones(len(images), 1, 40, 48, dtype=torch.bool)
        ours = COLOUR_OPS[name](batch, args, counted).permute(0, 2, 3, 1).numpy()
        for image, got in zip(images, ours, strict=True):
            expected = timm_op(name, image, arg).astype(np.float64)
            assert np.abs(got - expected).max() <= 1, (name, arg)


# Mean absolute difference (levels, 0-255) of the one bicubic resample against PIL's, away from borders and fill
# edges, on the photo-like image with sensor noise. Measured: geometric ops 0.60-0.79; the crop 0.32 (upsampled),
# 0.52 (~1x), 1.59 (a whole 500x375 JPEG: reduced decoding, then upsampled 1.2x) and 2.70 (400x300 box, downscaled
# 1.8x without PIL's antialiasing, which aliases the noise).
GEOMETRIC_MAD = 1.5
CROP_MAD = 3.5


@pytest.mark.parametrize(
    ("name", "arg"),
    [("Rotate", 12.0), ("Rotate", -27.0), ("ShearX", 0.27), ("ShearY", -0.2), ("TranslateXRel", 0.3),
     ("TranslateYRel", -0.4)],
)  # fmt: skip
def test_geometric_ops_match_timms_within_a_documented_mean_difference(name, arg):
    size = 64
    image = photo(size, size, 1)
    fill = tuple(round(255 * m) for m in MEAN)
    expected = np.asarray(
        timm_aa.NAME_TO_OP[name](
            Image.fromarray(image), arg, fillcolor=fill, resample=Image.Resampling.BICUBIC
        )
    ).astype(np.float64)
    canvas = np.pad(image, ((0, size), (0, size), (0, 0)), mode="edge")
    affine = torch.from_numpy(geometric_matrix(name, arg, (size, size))[:2]).float()[None]
    pixels, valid = resample(
        torch.from_numpy(canvas)[None], affine, torch.tensor([[0.0, 0, size, size]]), (size, size)
    )
    ours = torch.where(valid, pixels, torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1))
    ours = ours[0].permute(1, 2, 0).numpy()
    # Away from the image border and from the edge of the filled area (3 pixels, the bicubic reach and more).
    inside = valid[0, 0].numpy()
    core = np.zeros_like(inside)
    core[4:-4, 4:-4] = True
    for shift in ((0, 3), (0, -3), (3, 0), (-3, 0)):
        core &= np.roll(inside, shift, axis=(0, 1))
    assert core.sum() > size * size // 4
    mad = np.abs(ours - expected)[core].mean()
    assert mad <= GEOMETRIC_MAD, f"{name} {arg}: mean absolute difference {mad:.2f} levels"
    # The fill is timm's fill, in the same place (up to the boundary pixels).
    far_outside = ~inside
    for shift in ((0, 2), (0, -2), (2, 0), (-2, 0)):
        far_outside &= ~np.roll(inside, shift, axis=(0, 1))
    assert np.array_equal(ours[far_outside], expected[far_outside])


def jpeg(image: np.ndarray, quality: int = 92) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.mark.parametrize(
    "box", [(40, 60, 300, 400), (0, 0, 375, 500), (100, 150, 120, 90), (10, 20, 230, 230)]
)
def test_the_crop_matches_timms_random_resized_crop_within_a_documented_mean_difference(box):
    # Large boxes go through JPEG's reduced decoding and an integer reduction; small ones are upsampled.
    original = photo(375, 500, 2)
    value = jpeg(original)
    decoded = Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    top, left, h, w = box
    expected = np.asarray(
        decoded.resize((224, 224), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    )
    spec = device_augment_spec((224, 224), MEAN, STD, "light")
    transform = DecodeForDevice(spec)
    image = Image.open(io.BytesIO(value["bytes"]))
    canvas, to_canvas, bounds = transform._cut_out(image, False, box, 0)
    affine = torch.from_numpy((to_canvas @ crop_matrix(box, (224, 224)))[:2]).float()[None]
    pixels, valid = resample(
        stack_canvases([torch.from_numpy(canvas)], spec.canvas_hw),
        affine,
        torch.tensor([bounds]).float(),
        (224, 224),
    )
    assert valid.all()
    ours = pixels[0].permute(1, 2, 0).numpy()
    difference = np.abs(ours - expected.astype(np.float64))[4:-4, 4:-4]
    assert difference.mean() <= CROP_MAD, (
        f"crop {box}: mean absolute difference {difference.mean():.2f} levels"
    )


def records_of_timm(count: int, seed: int) -> list[list[tuple[str, float]]]:
    """What timm's own RandAugment applies to `count` images: per image, the (op, level argument) it called."""
    spec = device_augment_spec((224, 224), MEAN, STD, "deit")
    ops = spec.rand_augment_ops()
    calls: list[tuple[str, float]] = []
    for op in ops:
        op.aug_fn = lambda image, *args, _name=op.name, **kwargs: (
            calls.append((_name, *args, 0.0)[:2]) or image
        )
    rand_augment = timm_aa.RandAugment(ops, num_layers=2)
    image = Image.new("RGB", (4, 4))
    records = []
    for index in range(count):
        with seeded_global_rngs(seed * 1_000_003 + index):
            calls.clear()
            rand_augment(image)
            records.append(list(calls))
    return records


def records_of_device_path(params: list[dict]) -> list[list[tuple[str, float]]]:
    return [
        [
            (OPS[code], arg)
            for code, arg in zip(p["ops"].tolist(), p["args"].tolist(), strict=True)
            if code != NO_OP
        ]
        for p in params
    ]


def draw(count: int, seed: int) -> list[dict]:
    transform = DecodeForDevice(device_augment_spec((224, 224), MEAN, STD, "deit"))
    params = []
    for index in range(count):
        with seeded_global_rngs(seed * 1_000_003 + index):
            params.append(transform.draw_params())
    return params


def magnitude(name: str, arg: float) -> float | None:
    """The magnitude (0-10) behind a continuous level argument; None for the quantised ops."""
    scale = {"Rotate": 3.0, "ShearX": 0.03, "ShearY": 0.03, "TranslateXRel": 0.045, "TranslateYRel": 0.045}
    if name in scale:
        return abs(arg) / scale[name]
    if name.endswith("Increasing") and name not in ("PosterizeIncreasing", "SolarizeIncreasing"):
        return abs(arg - 1.0) / 0.09
    return None


def chi_square(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson's two-sample statistic for two histograms over the same bins (empty bins dropped)."""
    table = np.stack([first, second]).astype(np.float64)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


def assert_same_distribution_as_timm(
    ours: list[list[tuple[str, float]]], timm: list[list[tuple[str, float]]]
):
    """Op frequencies (15 ops + skipped layers) and magnitudes (8 bins) agree with timm's at p = 0.001."""

    def op_counts(records):
        counts = np.array([sum(name == op for record in records for name, _ in record) for op in OPS])
        return np.append(counts, 2 * len(records) - counts.sum())

    def magnitude_histogram(records):
        values = [magnitude(name, arg) for record in records for name, arg in record]
        values = [value for value in values if value is not None]
        return np.histogram(values, bins=[0, 7.5, 8.25, 8.6, 8.9, 9.1, 9.4, 9.75, 10.01])[0]

    assert chi_square(op_counts(ours), op_counts(timm)) < CHI2_999[15]
    assert chi_square(magnitude_histogram(ours), magnitude_histogram(timm)) < CHI2_999[7]


def test_op_frequencies_and_magnitudes_follow_timms_rand_augment():
    assert_same_distribution_as_timm(records_of_device_path(draw(3000, 0)), records_of_timm(3000, 1))


def test_the_statistical_test_fails_when_parameters_are_drawn_once_per_batch():
    # Negative control: the same number of views, but one draw per batch of 32 shared by all its samples.
    per_batch = [p for p in draw(3000 // 32 + 1, 2) for _ in range(32)][:3000]
    with pytest.raises(AssertionError):
        assert_same_distribution_as_timm(records_of_device_path(per_batch), records_of_timm(3000, 1))


def test_the_erasing_rate_and_area_follow_timms_random_erasing():
    from timm.data.random_erasing import RandomErasing

    ours = torch.stack([p["erase"] for p in draw(4000, 3)])
    erasing = RandomErasing(0.25, mode="pixel", device="cpu")
    timm_boxes = []
    for index in range(4000):
        canvas = torch.zeros(1, 56, 56)
        with seeded_global_rngs(index):
            erasing(canvas)
        timm_boxes.append(float((canvas != 0).sum()) / 56**2)
    timm_rate = np.mean([area > 0 for area in timm_boxes])
    our_rate = float(ours[:, 0].mean())
    # Binomial sd of a rate of 0.25 over 4000 draws is 0.0068; both within 4 sd of timm's p, and of each other.
    assert abs(our_rate - 0.25) < 0.028 and abs(timm_rate - 0.25) < 0.028
    our_area = (ours[:, 3] * ours[:, 4] / 224**2)[ours[:, 0] > 0]
    timm_area = torch.tensor([area for area in timm_boxes if area > 0])
    # Uniform in [0.02, 1/3]: mean 0.177, sd 0.09; the means of ~1000 draws agree within 0.015 (5 sd).
    assert abs(float(our_area.mean()) - float(timm_area.mean())) < 0.015


def views_dataset(images: list[np.ndarray], preset: str = "deit", output: int = 64) -> SeededViews:
    import datasets

    from deit_distill.training.transforms import ImageExamples

    rows = datasets.Dataset.from_dict(
        {"image": [jpeg(image) for image in images], "label": list(range(len(images)))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    return SeededViews(
        ImageExamples(rows, DecodeForDevice(device_augment_spec((output, output), MEAN, STD, preset)))
    )


def augmented(views: SeededViews, keys: list[ViewKey], mixing: bool = False) -> dict:
    spec = views.dataset.image_transform.spec
    collator = DistillationCollator(
        num_classes=10,
        mixup_alpha=0.8 if mixing else 0,
        cutmix_alpha=1.0 if mixing else 0,
        device_augment=spec,
    )
    examples = views.__getitems__(keys)
    batch = collator([{k: v for k, v in e.items() if k != "view"} for e in examples], views=keys)
    assert batch["pixel_values"].dtype == torch.uint8  # uint8 is what crosses to the device
    return {**batch, "pixel_values": augment_batch(batch["pixel_values"], batch[AUGMENT_PARAMS])}


def test_a_batch_of_one_image_gives_distinct_views():
    views = views_dataset([photo(120, 160, 4)])
    keys = [ViewKey(0, 0, 0, 0, repeat) for repeat in range(16)]
    pixels = augmented(views, keys)["pixel_values"]
    flat = pixels.flatten(1)
    distinct = torch.cdist(flat, flat) + torch.eye(len(keys)) * 1e9
    assert distinct.min() > 1.0
    assert torch.isfinite(pixels).all()


def test_same_keys_give_the_same_pixels_in_any_batch_split():
    views = views_dataset([photo(120, 160, seed) for seed in range(6)])
    keys = [ViewKey(3, 1, 0, index % 6, index // 6, index) for index in range(12)]
    whole = augmented(views, keys)["pixel_values"]
    halves = torch.cat(
        [augmented(views, keys[:6])["pixel_values"], augmented(views, keys[6:])["pixel_values"]]
    )
    assert torch.equal(whole, halves)
    again = augmented(views, list(reversed(keys)))["pixel_values"]
    assert torch.equal(whole, again.flip(0))


def test_mixing_on_the_device_uses_the_collators_draw_and_mixes_labels_on_the_host():
    views = views_dataset([photo(120, 160, seed) for seed in range(4)])
    keys = [ViewKey(0, 0, 5, index, 0, index) for index in range(4)]
    plain = augmented(views, keys)
    mixed = augmented(views, keys, mixing=True)
    collator = DistillationCollator(num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0)
    lam, box = collator.mix_params(mix_generator(keys[0]), (64, 64))
    partner = torch.tensor([1, 0, 3, 2])
    if box is None:
        expected = plain["pixel_values"] * lam + plain["pixel_values"][partner] * (1 - lam)
    else:
        y0, y1, x0, x1 = box
        expected = plain["pixel_values"].clone()
        expected[:, :, y0:y1, x0:x1] = plain["pixel_values"][partner, :, y0:y1, x0:x1]
    assert torch.allclose(mixed["pixel_values"], expected, atol=1e-5)
    assert mixed["labels"].shape == (4, 10) and torch.allclose(mixed["labels"].sum(1), torch.ones(4))


@pytest.mark.slow
def test_any_number_of_workers_gives_the_same_device_batches():
    from deit_distill.training.sampler import ViewSampler
    from deit_distill.training.views import ViewCollator

    views = views_dataset([photo(90, 120, seed) for seed in range(8)])
    collator = ViewCollator(
        DistillationCollator(
            num_classes=10,
            mixup_alpha=0.8,
            cutmix_alpha=1.0,
            device_augment=views.dataset.image_transform.spec,
        )
    )
    runs = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            views,
            batch_size=4,
            sampler=ViewSampler(views, global_batch_size=4, seed=1),
            collate_fn=collator,
            num_workers=workers,
        )
        runs.append([augment_batch(b["pixel_values"], b[AUGMENT_PARAMS]) for b in loader])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_light_preset_only_crops_and_flips():
    views = views_dataset([photo(120, 160, 6)], preset="light")
    params = views.__getitems__([ViewKey(0, 0, 0, 0, r) for r in range(20)])
    for example in params:
        assert (example[AUGMENT_PARAMS]["ops"] == NO_OP).all()
        assert example[AUGMENT_PARAMS]["erase"][0] == 0


def test_every_rand_augment_op_is_either_geometric_or_a_colour_op():
    assert set(OPS) == GEOMETRIC_OPS | set(COLOUR_OPS)
    assert not GEOMETRIC_OPS & set(COLOUR_OPS)


def test_a_bad_augment_on_is_one_error_naming_the_flag(tmp_path):
    from deit_distill.training.commands.train import main
    from deit_distill.training.errors import UserError

    with pytest.raises(UserError, match="augment_on"):
        main(["--augment_on", "gpu", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true"])
    with pytest.raises(UserError, match="nothing to do with --augmentation none"):
        main(["--augment_on", "device", "--augmentation", "none", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_teacher_cache_of_the_other_path_is_refused_naming_the_field(trained_runs, tmp_path):
    from conftest import TINY_RUN, TINY_STUDENT

    from deit_distill.training.commands.train import main
    from deit_distill.training.errors import UserError

    run = [
        *TINY_STUDENT,
        *TINY_RUN,
        "--distillation_type",
        "soft",
        "--teacher_cache",
        str(trained_runs["cache"]),
    ]
    with pytest.raises(UserError, match=r"views\.augment_on"):
        main(
            [*run, "--augmentation", "light", "--augment_on", "device", "--output_dir", str(tmp_path / "run")]
        )


def tiny_recipe(tmp_path) -> str:
    recipe = {
        "dataset_name": "fashion_mnist",
        "max_train_samples": 20,
        "max_eval_samples": 10,
        "image_size": 28,
        "crop_pct": 1.0,
        "config_overrides": "patch_size=7,hidden_size=24,num_hidden_layers=1,num_attention_heads=2",
        "augmentation": "deit",
        "output_dir": str(tmp_path / "never_written"),
        "seed": 0,
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return str(path)


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_views_command_draws_a_grid_of_images_and_their_views_through_either_path(tmp_path, augment_on):
    from deit_distill.training.commands.views import main

    output = tmp_path / "views.png"
    argv = [tiny_recipe(tmp_path), "--output", str(output), "--num_images", "2", "--num_views", "3"]
    assert main([*argv, "--augment_on", augment_on, "--epoch", "4"]) == 0
    sheet = Image.open(output)
    cell = 112  # 28 px views enlarged 4x
    assert sheet.size == (4 * (cell + 4) + 4, 20 + 2 * (cell + 4) + 4)
    assert not (tmp_path / "never_written").exists()


def test_views_command_refuses_to_overwrite_and_names_bad_flags(tmp_path):
    from deit_distill.training.commands.views import main
    from deit_distill.training.errors import UserError

    output = tmp_path / "views.png"
    output.write_bytes(b"mine")
    with pytest.raises(UserError, match="--overwrite true"):
        main([tiny_recipe(tmp_path), "--output", str(output)])
    assert output.read_bytes() == b"mine"
    with pytest.raises(UserError, match="--num_views must be >= 1"):
        main([tiny_recipe(tmp_path), "--output", str(tmp_path / "v.png"), "--num_views", "0"])
    with pytest.raises(UserError, match="augment_on"):
        main([tiny_recipe(tmp_path), "--output", str(tmp_path / "v.png"), "--augment_on", "gpu"])
    with pytest.raises(UserError, match="neither a recipe"):
        main([str(tmp_path / "missing"), "--output", str(tmp_path / "v.png")])


@pytest.mark.slow
def test_a_device_path_cache_replays_the_live_teachers_losses(trained_runs, tmp_path):
    from conftest import TINY_RUN, TINY_STUDENT

    from deit_distill.training.commands.cache_teacher import main as cache_teacher
    from deit_distill.training.commands.train import main as train

    run = [
        *TINY_STUDENT,
        *TINY_RUN,
        "--augmentation",
        "deit",
        "--augment_on",
        "device",
        "--distillation_type",
        "soft",
    ]
    teacher = ["--teacher", str(trained_runs["teacher"])]
    cache_teacher([*run, *teacher, "--teacher_cache", str(tmp_path / "cache")])
    losses = {}
    for name, source in (("live", teacher), ("cached", ["--teacher_cache", str(tmp_path / "cache")])):
        train([*run, *source, "--output_dir", str(tmp_path / name)])
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        losses[name] = [entry["loss"] for entry in history if "loss" in entry]
    # As for the worker path (test_teacher_cache): the cache stores log-probabilities, equal up to float rounding.
    assert len(losses["live"]) == 2 and losses["cached"] == pytest.approx(losses["live"], rel=1e-5)
