"""The same pixels everywhere: for every image mode, the tensor the model receives from training's eval path (which
`deit-distill eval` uses) is identical to the one `pipeline("image-classification", trust_remote_code=True)` feeds
it in a process where this project cannot be imported (`deit-distill predict` runs that pipeline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, ResNetConfig, ResNetForImageClassification

from deit_distill.model_cards.run import code_files
from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    attach_pipeline,
    build_image_processor,
)
from deit_distill.training.data import decode_image
from deit_distill.training.run_record import SavedRun
from deit_distill.training.transforms import build_eval_transform, with_image_transform

LABELS = ["cat", "dog", "bird", "fish", "frog"]
ORIENTATION = 0x0112  # the EXIF tag
# 16-bit grey levels of the two halves of "I;16 halves", and the 8-bit levels they must become (v / 257).
HALVES_16_BIT, HALVES_8_BIT = (25700, 51400), (100, 200)

# Runs with the project made unimportable (as in test_remote_code.py): the editable finder, the repo root and the
# cwd are removed, and the child proves it. Each model's pipeline classifies each image given as a path and as an
# opened (unconverted) PIL image; a forward pre-hook records the pixel tensor the model receives.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, os, sys

    args = json.loads(sys.argv[1])
    repo = os.path.realpath(args["repo"])
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") not in (repo, os.getcwd())]
    sys.path_importer_cache.clear()
    for name in ("modeling_deit_distill", "training", "model_cards"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable"

    import torch
    from PIL import Image
    from transformers import pipeline

    recorded = {}
    for model_name, model_dir in args["models"].items():
        classifier = pipeline("image-classification", model=model_dir, trust_remote_code=True)
        received = []
        classifier.model.register_forward_pre_hook(
            lambda module, inputs, kwargs: received.append(kwargs["pixel_values"][0].clone()), with_kwargs=True
        )
        pixels = {}
        for image_name, path in args["images"].items():
            for kind, image in (("path", path), ("pil", Image.open(path))):
                received.clear()
                classifier(image)
                (pixels[f"{image_name}|{kind}"],) = received
        pipeline_class = type(classifier)
        recorded[model_name] = {"class": f"{pipeline_class.__module__}.{pipeline_class.__name__}", "pixels": pixels}
    torch.save(recorded, args["out"])
    """
)


def _exif_jpeg(path: Path, orientation: int) -> None:
    # Non-square, so a missing rotation changes the shape as well as the content.
    array = np.random.default_rng(orientation).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(array).save(path, exif=exif, quality=95)


def _write_images(directory: Path) -> dict[str, tuple[Path, str]]:
    """One file per case: {name: (path, the mode it opens in)}."""
    rng = np.random.default_rng(0)
    shape = (37, 45)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    halves = np.full((64, 64), HALVES_16_BIT[0], np.uint16)
    halves[:, 32:] = HALVES_16_BIT[1]
    images = {
        "RGB": (Image.fromarray(rgb), "png"),
        "L": (Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)), "png"),
        "LA": (Image.fromarray(rng.integers(0, 256, (*shape, 2), dtype=np.uint8)), "png"),
        "P": (palette, "png"),
        "RGBA": (Image.fromarray(rng.integers(0, 256, (*shape, 4), dtype=np.uint8)), "png"),
        "CMYK": (Image.fromarray(rng.integers(0, 256, (*shape, 4), dtype=np.uint8), "CMYK"), "tiff"),
        "I;16": (Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16)), "png"),
        "I": (Image.fromarray(rng.integers(0, 65536, shape).astype(np.int32)), "tiff"),
        "I 8-bit range": (Image.fromarray(rng.integers(0, 256, shape).astype(np.int32)), "tiff"),
        "F": (Image.fromarray(rng.random(shape, dtype=np.float32)), "tiff"),
        "I;16 halves": (Image.fromarray(halves), "png"),
    }
    files = {}
    for index, (name, (image, extension)) in enumerate(images.items()):
        files[name] = (directory / f"{index}.{extension}", image.mode)
        image.save(files[name][0])
    files["P transparency"] = (directory / "p_transparency.png", "P")
    palette.save(files["P transparency"][0], transparency=3)
    for orientation in (6, 8):
        files[f"EXIF {orientation}"] = (directory / f"exif_{orientation}.jpg", "RGB")
        _exif_jpeg(files[f"EXIF {orientation}"][0], orientation)
    return files


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> SimpleNamespace:
    """A tiny DeiTDistill model and a tiny transformers ResNet, each saved with the pipeline attached; every test
    image; the training-side tensors; and what the pipeline fed each model in one clean child process."""
    root = tmp_path_factory.mktemp("parity")
    config = DeiTDistillConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=3,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    teacher_config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        id2label=config.id2label,
        label2id=config.label2id,
    )
    torch.manual_seed(0)
    models = {"deit": root / "deit", "resnet": root / "resnet"}
    DeiTDistillForImageClassification(config).save_pretrained(models["deit"])
    ResNetForImageClassification(teacher_config).save_pretrained(models["resnet"])
    for directory in models.values():
        # crop_pct below 1: the pixels go through resize and centre crop, as with the paper's eval.
        build_image_processor(config, crop_pct=0.875).save_pretrained(directory)
        attach_pipeline(directory)

    image_dir = root / "images"
    image_dir.mkdir()
    images = _write_images(image_dir)
    names = list(images)

    # Training's eval path, as `deit-distill eval` runs it: the saved processor, `decode_image` on the column.
    processor = AutoImageProcessor.from_pretrained(models["deit"])
    column = datasets.Dataset.from_dict(
        {"image": [str(images[name][0]) for name in names], "label": [0] * len(names)}
    ).cast_column("image", datasets.Image())
    evaluated = with_image_transform(column, build_eval_transform(processor))
    training = {name: evaluated[i]["pixel_values"] for i, name in enumerate(names)}

    out = root / "recorded.pt"
    arguments = {
        "repo": str(Path(__file__).resolve().parents[1]),
        "models": {name: str(path) for name, path in models.items()},
        "images": {name: str(path) for name, (path, _) in images.items()},
        "out": str(out),
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(arguments)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(
        config=config,
        models=models,
        images=images,
        processor=processor,
        training=training,
        recorded=torch.load(out),
    )


CASES = [
    "RGB",
    "L",
    "LA",
    "P",
    "P transparency",
    "RGBA",
    "CMYK",
    "I;16",
    "I",
    "I 8-bit range",
    "F",
    "I;16 halves",
    "EXIF 6",
    "EXIF 8",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("model", ["deit", "resnet"])
def test_pipeline_in_a_clean_process_feeds_the_model_exactly_the_training_eval_tensor(parity, model, case):
    path, mode = parity.images[case]
    with Image.open(path) as image:
        assert image.mode == mode  # the file really is in the mode under test
    expected = parity.training[case]
    for kind in ("path", "pil"):
        received = parity.recorded[model]["pixels"][f"{case}|{kind}"]
        assert received.dtype == expected.dtype and received.shape == expected.shape == (3, 32, 32)
        assert torch.equal(received, expected), f"{kind}: max diff {(received - expected).abs().max()}"


def test_every_image_mode_is_covered(parity):
    assert set(CASES) == set(parity.images)
    modes = {mode for _, mode in parity.images.values()}
    assert {"RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"} <= modes


@pytest.mark.parametrize("model", ["deit", "resnet"])
def test_the_pipeline_is_the_shipped_class_loaded_as_remote_code(parity, model):
    name = parity.recorded[model]["class"]
    assert name.startswith("transformers_modules.")
    assert name.endswith("pipeline_deit_distill.DeiTDistillImageClassificationPipeline")


def test_training_run_processor_gives_the_same_tensor_as_the_saved_one(parity):
    # Training evaluates with the processor it built; eval and the pipeline load the saved one.
    built = build_eval_transform(build_image_processor(parity.config, crop_pct=0.875))
    for case in ("RGB", "I;16", "EXIF 6"):
        assert torch.equal(built(decode_image(str(parity.images[case][0]))), parity.training[case])


def test_16_bit_images_are_rescaled_not_saturated(parity):
    path, _ = parity.images["I;16"]
    raw = np.asarray(Image.open(path), dtype=np.float64)
    decoded = np.asarray(decode_image(str(path)))
    assert np.array_equal(decoded, np.repeat(np.rint(raw / 257)[..., None], 3, axis=-1).astype(np.uint8))

    # Two flat halves: far from their border the model's input is the hand-normalised 8-bit level, not white.
    mean, std = np.array(parity.processor.image_mean), np.array(parity.processor.image_std)
    for model in ("deit", "resnet"):
        pixels = parity.recorded[model]["pixels"]["I;16 halves|path"].numpy()
        for column, level in ((0, HALVES_8_BIT[0]), (-1, HALVES_8_BIT[1])):
            np.testing.assert_allclose(pixels[:, 0, column], (level / 255 - mean) / std, atol=1e-6)


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1)])
def test_training_decode_applies_the_exif_orientation(parity, orientation, turns):
    path, _ = parity.images[f"EXIF {orientation}"]
    with Image.open(path) as image:
        stored = np.asarray(image.convert("RGB"))  # the pixels as stored, before the rotation
    decoded = decode_image(str(path))
    assert decoded.size == (24, 40)  # (width, height): the stored 40x24 image, upright
    # Orientation 6: the camera was turned, the image is shown rotated 90 degrees clockwise; 8: anticlockwise.
    assert np.array_equal(np.asarray(decoded), np.rot90(stored, k=turns))
    assert np.array_equal(np.asarray(decode_image(Image.open(path))), np.asarray(decoded))


def test_attach_pipeline_ships_the_pipeline_file_with_a_convnet(parity):
    # A transformers ResNet has no auto_map: the pipeline module is its only code, and it is what gets pushed.
    run = SavedRun.read(parity.models["resnet"])
    assert "auto_map" not in run.config
    assert code_files(run) == ["pipeline_deit_distill.py"]
    assert run.config["custom_pipelines"]["image-classification"]["pt"] == ["AutoModelForImageClassification"]
    assert "pipeline_deit_distill.py" in code_files(SavedRun.read(parity.models["deit"]))


def test_attach_pipeline_needs_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        attach_pipeline(tmp_path)


def _has_pipeline(directory: Path) -> bool:
    custom = json.loads((directory / "config.json").read_text()).get("custom_pipelines", {})
    return "image-classification" in custom and (directory / "pipeline_deit_distill.py").is_file()


def test_the_trainer_attaches_the_pipeline_to_every_model_it_saves(parity, tmp_path):
    from transformers import TrainingArguments

    from deit_distill.training.trainer import DistillationTrainer

    model = DeiTDistillForImageClassification.from_pretrained(parity.models["deit"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = DistillationTrainer(model=model, args=args, processing_class=parity.processor)
    trainer.save_model()
    trainer.save_model(str(tmp_path / "checkpoint-1"), _internal_call=True)  # as Trainer saves checkpoints
    assert _has_pipeline(tmp_path) and _has_pipeline(tmp_path / "checkpoint-1")


def test_convert_attaches_the_pipeline_to_ours_and_not_to_the_native_copy(parity, tmp_path):
    from deit_distill.training.commands.convert import build_parser, run_convert

    parser = build_parser()
    for target, attached in (("deit-distill", True), ("transformers", False)):
        output = tmp_path / target
        argv = ["--from", "deit-distill", "--source", str(parity.models["deit"]), "--output", str(output)]
        run_convert(parser.parse_args([*argv, "--to", target]))
        assert _has_pipeline(output) is attached
    # The native copy loads without remote code, so nothing in it may ask for it.
    assert "custom_pipelines" not in json.loads((tmp_path / "transformers" / "config.json").read_text())


# ------------------------------------------------------------------------------------------------------------------
# The pixels themselves, against references written here with PIL (to read the stored values) and NumPy (for every
# conversion): the parity above shows the pipeline and training agree, these that what they agree on is right.


def reference_rgb(path: Path) -> np.ndarray:
    """The upright RGB uint8 pixels `to_rgb` promises (see its docstring), computed from the stored values."""
    with Image.open(path) as image:
        mode, raw = image.mode, np.asarray(image)
        palette = np.asarray(image.getpalette() or [], dtype=np.float64).reshape(-1, 3)
        transparent = image.info.get("transparency")
    if mode == "RGB":
        return raw
    if mode == "CMYK":  # Pillow's CMYK -> RGB: (255 - C) (255 - K) / 255
        cmyk = raw.astype(np.float64)
        return np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)
    if mode in ("I;16", "I", "F"):
        values = raw.astype(np.float64)
        if mode == "I;16" or values.max() > 255:
            values = values / 257  # the 16-bit range onto 8 bits
        elif mode == "F":
            values = values * 255  # float in [0, 1]
        grey = np.clip(np.rint(values), 0, 255)
        return np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)
    if mode == "P":
        colour = palette[raw]
        alpha = np.where(raw == transparent, 0.0, 255.0)[..., None] if transparent is not None else None
    elif mode in ("L", "LA"):
        colour = np.repeat(raw[..., :1].astype(np.float64), 3, axis=-1) if mode == "LA" else None
        if mode == "L":
            return np.repeat(raw[..., None], 3, axis=-1)
        alpha = raw[..., 1:].astype(np.float64)
    elif mode == "RGBA":
        colour, alpha = raw[..., :3].astype(np.float64), raw[..., 3:].astype(np.float64)
    else:
        raise AssertionError(f"no reference for mode {mode}")
    if alpha is None:
        return colour.astype(np.uint8)
    # Composited on white: transparent areas are background.
    return np.rint(colour * alpha / 255 + 255 * (1 - alpha / 255)).astype(np.uint8)


@pytest.mark.parametrize("case", [case for case in CASES if not case.startswith("EXIF")])
def test_every_mode_decodes_to_the_reference_rgb_pixels(parity, case):
    path, _ = parity.images[case]
    decoded = np.asarray(decode_image(str(path)))
    expected = reference_rgb(path)
    assert decoded.shape == expected.shape and decoded.dtype == np.uint8
    # Compositing and CMYK use PIL's integer arithmetic: within one level of the exact value.
    exact = case not in ("LA", "RGBA", "P transparency", "CMYK")
    difference = np.abs(decoded.astype(int) - expected.astype(int))
    assert difference.max() <= (0 if exact else 1), case
    assert (difference > 0).mean() < (1e-9 if exact else 0.5)


@pytest.mark.parametrize("case", ["RGB", "P transparency", "I;16", "EXIF 6"])
def test_the_model_input_is_the_reference_resize_crop_and_normalisation(parity, case):
    # The processor: bicubic resize to 36x36 (32 / crop_pct 0.875), centre crop 32, rescale to [0, 1], normalise.
    path, _ = parity.images[case]
    rgb = decode_image(str(path))
    if case == "EXIF 6":
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(rgb), np.rot90(np.asarray(image.convert("RGB")), k=-1))
    else:
        assert np.abs(np.asarray(rgb).astype(int) - reference_rgb(path).astype(int)).max() <= 1
    resized = np.asarray(rgb.resize((36, 36), Image.Resampling.BICUBIC), dtype=np.float64)[2:34, 2:34] / 255
    mean, std = np.array(parity.processor.image_mean), np.array(parity.processor.image_std)
    reference = ((resized - mean) / std).transpose(2, 0, 1)
    for model in ("deit", "resnet"):
        received = parity.recorded[model]["pixels"][f"{case}|path"].double().numpy()
        levels = np.abs(received - reference) * std[:, None, None] * 255  # in 8-bit levels
        # PIL's and torchvision's bicubic round (and clip overshoot) differently: within 2 levels, a fraction of a
        # level on average, where a wrong decode, rotation, crop or normalisation is off by tens of levels.
        assert levels.max() <= 2.0 + 1e-4 and levels.mean() < 0.5, (model, levels.max(), levels.mean())
