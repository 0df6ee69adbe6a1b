"""Start-up at scale: a folder of class sub-folders is read from one listing, as `datasets`' imagefolder reads it.

`datasets.load_dataset("imagefolder", data_dir=...)` globs the folder about 30 times with a stat per file on
every start (bench/startup.py measures it); `class_folders_dataset` builds the same dataset from the one listing
the data path already makes. The reference is `datasets` itself on the same folder.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from deit_distill.training.data import _list_folder, class_folders_dataset


def write_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"im{index:02d}_{name}.png")


def rows(dataset: datasets.Dataset) -> list[tuple[str, int]]:
    images = dataset.cast_column("image", datasets.Image(decode=False))
    return [(row["image"]["path"], row["label"]) for row in images]


def test_class_folders_give_the_rows_labels_and_features_datasets_gives(tmp_path):
    root = tmp_path / "images"
    # Names that sort differently as text and as numbers, and uneven classes.
    write_folder(root, {"cat": 3, "dog10": 2, "dog9": 4, "Zebra": 1})
    reference = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    built = class_folders_dataset(root, _list_folder(root))
    assert list(built) == list(reference) == ["train"]
    assert built["train"].features == reference["train"].features
    assert rows(built["train"]) == rows(reference["train"])
    # Decoded images are the files' pixels.
    first = built["train"][0]
    assert np.array_equal(np.asarray(first["image"]), np.asarray(Image.open(rows(reference["train"])[0][0])))


@pytest.mark.parametrize(
    "layout",
    [
        "split-named folder",
        "split word in a file name",
        "metadata file",
        "nested",
        "loose image",
        "dunder folder",
    ],
)
def test_folders_datasets_reads_another_way_are_left_to_datasets(tmp_path, layout):
    root = tmp_path / "images"
    write_folder(root, {"cat": 2} if layout == "one class" else {"cat": 2, "dog": 2})
    if layout == "one class":
        pass  # `datasets` gives no labels then
    elif layout == "split-named folder":
        write_folder(root / "val", {"cat": 1})
    elif layout == "split word in a file name":
        Image.new("RGB", (4, 4)).save(root / "cat" / "x_test_1.png")
    elif layout == "metadata file":
        (root / "cat" / "metadata.csv").write_text("file_name,caption\n")
    elif layout == "nested":
        write_folder(root / "dog" / "puppies", {"small": 1})
    elif layout == "loose image":
        Image.new("RGB", (4, 4)).save(root / "loose.png")
    else:
        write_folder(root, {"__pycache__": 1})
    assert class_folders_dataset(root, _list_folder(root)) is None
