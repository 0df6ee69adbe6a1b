"""The data side: dataset loading, image decoding, transforms and plain collation (mixing: test_views.py)."""

import gzip
import io
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from transformers import DeiTImageProcessor

from deit_distill.training import data as data_module
from deit_distill.training.collator import DistillationCollator
from deit_distill.training.data import (
    CorruptImageError,
    decode_image,
    load_image_dataset,
    scan_images,
    to_rgb,
)
from deit_distill.training.transforms import (
    build_eval_transform,
    build_train_transform,
    output_size,
    with_image_transform,
)

FASHION_MNIST_PRESENT = all(
    (data_module.FASHION_MNIST_DIR / name).is_file()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")
)
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_PRESENT,
    reason=f"Fashion-MNIST not in {data_module.FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def processor():
    # Non-square crop, so a height/width swap anywhere shows.
    return DeiTImageProcessor(
        size={"height": 40, "width": 48},
        crop_size={"height": 32, "width": 40},
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.25, 0.3],
    )


def make_image(mode: str, size=(20, 14), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An imagefolder with two classes, mixed image modes and sizes, and two corrupt files."""
    root = tmp_path_factory.mktemp("folder")
    for label, modes in (
        ("cat", ["L", "RGBA", "P", "RGB", "CMYK"]),
        ("dog", ["RGB", "L", "RGBA", "P", "LA"]),
    ):
        (root / label).mkdir()
        for i, mode in enumerate(modes):
            image = make_image(mode, size=(20 + i, 14 + 2 * i), seed=i)
            image.save(root / label / f"{i}_{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    valid_png = png_bytes(make_image("RGB", size=(64, 64)))
    (root / "dog" / "truncated.png").write_bytes(valid_png[: len(valid_png) // 2])
    (root / "cat" / "garbage.png").write_bytes(b"this is not an image" * 10)
    return root


# ---------------------------------------------------------------- loading


@needs_fashion_mnist
def test_fashion_mnist_loads_70k_images_with_class_names_and_is_cached(tmp_path):
    start = time.perf_counter()
    first = load_image_dataset("fashion_mnist", cache_dir=str(tmp_path))
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dataset = load_image_dataset("fashion_mnist", cache_dir=str(tmp_path))
    cached_seconds = time.perf_counter() - start

    assert {name: len(split) for name, split in dataset.items()} == {"train": 60000, "validation": 10000}
    assert dataset["train"].features["label"].names == list(data_module.FASHION_MNIST_CLASSES)
    image = dataset["validation"][0]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    # Labels against the idx file read independently here.
    with gzip.open(data_module.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz", "rb") as file:
        expected = np.frombuffer(file.read()[8:], dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(dataset["validation"]["label"][:1000]), expected[:1000])
    assert first["train"][123]["label"] == dataset["train"][123]["label"]
    assert cached_seconds < min(1.0, build_seconds), (build_seconds, cached_seconds)


def stored_images(dataset):
    return [row["bytes"] for row in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


@needs_fashion_mnist
def test_subsets_are_stratified_and_fixed_by_seed():
    dataset = load_image_dataset("fashion_mnist", train_subset=1000, eval_subset=200, seed=3)
    assert np.bincount(np.asarray(dataset["train"]["label"])).tolist() == [100] * 10
    assert np.bincount(np.asarray(dataset["validation"]["label"])).tolist() == [20] * 10
    again = load_image_dataset("fashion_mnist", train_subset=1000, eval_subset=200, seed=3)
    other = load_image_dataset("fashion_mnist", train_subset=1000, eval_subset=200, seed=4)
    assert stored_images(again["train"]) == stored_images(dataset["train"])
    assert stored_images(other["train"]) != stored_images(dataset["train"])


def test_missing_fashion_mnist_names_the_package_and_the_hub_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*zalando-datasets"):
        load_image_dataset("fashion_mnist", cache_dir=str(tmp_path))


def test_imagefolder_without_eval_split_gets_a_disjoint_stratified_one(image_folder, tmp_path):
    dataset = load_image_dataset(str(image_folder), eval_fraction=0.25, cache_dir=str(tmp_path))
    assert dataset["train"].features["label"].names == ["cat", "dog"]
    raw = datasets.concatenate_datasets([dataset["train"], dataset["validation"]]).cast_column(
        "image", datasets.Image(decode=False)
    )
    paths = [row["path"] for row in raw["image"]]
    assert len(paths) == len(set(paths)) == 12
    assert len(dataset["validation"]) == 3
    assert set(dataset["validation"]["label"]) == {0, 1}


def test_string_labels_become_one_class_label_shared_by_both_splits(tmp_path):
    images = [{"bytes": png_bytes(make_image("RGB", seed=i)), "path": None} for i in range(6)]
    features = datasets.Features(
        {"img": datasets.Image(), "kind": datasets.Value("string"), "extra": datasets.Value("int64")}
    )
    train = datasets.Dataset.from_dict(
        {"img": images, "kind": list("babcab"), "extra": range(6)}, features=features
    )
    test = datasets.Dataset.from_dict(
        {"img": images[:2], "kind": ["c", "a"], "extra": range(2)}, features=features
    )
    (tmp_path / "data").mkdir()
    train.to_parquet(str(tmp_path / "data" / "train-0.parquet"))
    test.to_parquet(str(tmp_path / "data" / "test-0.parquet"))

    dataset = load_image_dataset(
        str(tmp_path), image_column="img", label_column="kind", cache_dir=str(tmp_path / "c")
    )
    for split in dataset.values():
        assert split.column_names == ["image", "label"]
        assert split.features["label"].names == ["a", "b", "c"]
    assert dataset["train"]["label"] == [1, 0, 1, 2, 0, 1]
    assert dataset["validation"]["label"] == [2, 0]


def test_missing_column_lists_the_columns_and_names_the_flag(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"no column 'img'.*\['image', 'label'\].*--image_column"):
        load_image_dataset(str(image_folder), image_column="img", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"no column 'fine_label'.*--label_column"):
        load_image_dataset(str(image_folder), label_column="fine_label", cache_dir=str(tmp_path))


def test_missing_split_lists_the_splits(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"no split 'dev'.*\['train'\].*--eval_split"):
        load_image_dataset(str(image_folder), eval_split="dev", cache_dir=str(tmp_path))


# ---------------------------------------------------------------- image modes and corrupt images


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode):
    assert (
        to_rgb(make_image(mode) if mode != "I;16" else Image.fromarray(np.full((4, 4), 1000, np.uint16))).mode
        == "RGB"
    )


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)  # black, fully transparent ...
    rgba[0, 0] = (10, 20, 30, 255)  # ... except one opaque pixel
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]

    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_greyscale_keeps_its_values_and_16_bit_is_rescaled_not_clipped():
    grey = np.arange(0, 256, 17, dtype=np.uint8).reshape(4, 4)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey))), np.repeat(grey[..., None], 3, axis=-1))
    sixteen = np.array([[0, 257 * 100, 65535]], np.uint16)
    assert np.asarray(to_rgb(Image.fromarray(sixteen)))[0, :, 0].tolist() == [0, 100, 255]


def corrupt_positions(dataset):
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    return {
        i: row["path"]
        for i, row in enumerate(raw["image"])
        if row["path"].endswith(("truncated.png", "garbage.png"))
    }


def test_scan_raise_names_the_index_and_the_file(image_folder, tmp_path):
    train = load_image_dataset(str(image_folder), eval_fraction=0.1, seed=0, cache_dir=str(tmp_path))["train"]
    first_index, first_path = min(corrupt_positions(train).items())
    with pytest.raises(CorruptImageError, match=rf"index {first_index}, file '{first_path}'"):
        scan_images(train, on_error="raise")


def test_scan_skip_drops_and_counts_corrupt_images(image_folder, tmp_path):
    dataset = load_image_dataset(str(image_folder), eval_fraction=0.1, seed=0, cache_dir=str(tmp_path))
    both = datasets.concatenate_datasets([dataset["train"], dataset["validation"]])
    clean, skipped = scan_images(both, on_error="skip")
    assert skipped == 2 and len(clean) == len(both) - 2
    assert corrupt_positions(clean) == {}
    assert all(row["image"].size[0] > 0 for row in clean)


def test_decoding_in_the_transform_names_the_file(image_folder, tmp_path, processor):
    train = load_image_dataset(str(image_folder), eval_fraction=0.1, seed=0, cache_dir=str(tmp_path))["train"]
    index, path = min(corrupt_positions(train).items())
    transformed = with_image_transform(train, build_eval_transform(processor))
    with pytest.raises(CorruptImageError, match=rf"file '{path}'.*scan_images"):
        transformed[index]


def test_decode_image_rejects_garbage_bytes_with_the_index():
    with pytest.raises(CorruptImageError, match=r"index 7\b"):
        decode_image({"bytes": b"\x89PNG garbage", "path": None}, index=7)


# ---------------------------------------------------------------- transforms


def test_eval_transform_equals_the_image_processor(processor):
    images = [make_image("RGB", size=(50 + 7 * i, 30 + 5 * i), seed=i) for i in range(3)]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    for transform in (build_eval_transform(processor), build_train_transform(processor, "none")):
        torch.testing.assert_close(
            torch.stack([transform(image) for image in images]), expected, rtol=0, atol=0
        )


def test_imagefolder_of_mixed_modes_comes_out_rgb_at_the_processor_size(image_folder, tmp_path, processor):
    dataset = load_image_dataset(str(image_folder), cache_dir=str(tmp_path))
    clean, _ = scan_images(
        datasets.concatenate_datasets([dataset["train"], dataset["validation"]]), on_error="skip"
    )
    examples = with_image_transform(clean, build_eval_transform(processor)).__getitems__(
        list(range(len(clean)))
    )
    assert len(examples) == len(clean) == 10
    for example in examples:
        assert example["pixel_values"].shape == (3, 32, 40) and example["pixel_values"].dtype == torch.float32
    assert [example["labels"] for example in examples] == clean["label"]


@pytest.mark.parametrize("preset", ["deit", "light"])
def test_train_presets_output_the_crop_size_normalised_with_the_processor_stats(processor, preset):
    transform = build_train_transform(processor, preset)
    image = make_image("RGB", size=(60, 45))
    out = transform(image)
    assert out.shape == (3, *output_size(processor)) == (3, 32, 40) and out.dtype == torch.float32
    # A constant image stays constant under crops and flips (not under RandAugment or erasing), so it shows
    # the normalisation directly: (value / 255 - mean) / std.
    if preset == "light":
        constant = transform(Image.new("RGB", (60, 45), (51, 102, 204)))
        expected = (torch.tensor([51, 102, 204]) / 255 - torch.tensor([0.4, 0.5, 0.6])) / torch.tensor(
            [0.2, 0.25, 0.3]
        )
        torch.testing.assert_close(constant, expected[:, None, None].expand(3, 32, 40), atol=1e-5, rtol=0)


def test_deit_preset_is_random(processor):
    transform = build_train_transform(processor, "deit")
    image = make_image("RGB", size=(60, 45))
    torch.manual_seed(0)
    assert not torch.equal(transform(image), transform(image))


def test_deit_preset_survives_randaugment_posterize_at_full_magnitude(processor):
    # m9 + mstd0.5 reaches the clip at 10 for ~0.1% of images, where timm asks Pillow to keep 0 bits.
    transform = build_train_transform(processor, "deit")
    rand_augment = next(step for step in transform.transforms if isinstance(step, RandAugment))
    op = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    assert np.asarray(op(make_image("RGB"))).max() == 0


def test_unknown_preset_is_rejected(processor):
    with pytest.raises(ValueError, match="preset must be one of"):
        build_train_transform(processor, "heavy")


def test_image_examples_decode_pil_images_too(processor):
    dataset = datasets.Dataset.from_dict(
        {"image": [make_image("L")], "label": [3]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    example = with_image_transform(dataset, build_eval_transform(processor))[0]
    assert example["labels"] == 3 and example["pixel_values"].shape == (3, 32, 40)


# ---------------------------------------------------------------- collator


def examples(n, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.rand(3, 4, 4, generator=g),
            "labels": int(torch.randint(0, num_classes, (1,), generator=g)),
        }
        for _ in range(n)
    ]


def test_plain_collator_stacks_and_keeps_class_indices():
    batch = DistillationCollator(5)(examples(3))
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (3,)
    assert not DistillationCollator(5, mixup_alpha=0.8).for_eval().mixes


def test_cutmix_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        DistillationCollator(cutmix_alpha=1.0)
