"""A specification of what `--dataset_name` accepts, and of the mistakes it refuses in one line.

Formats: every kind of source (`deit_distill.training.data.load_source`) is written here from the same images
and labels, loaded from another working directory, and compared with what was written: the pixels (decoded here
with PIL), the label of every image, and the class-name order. Mistakes: each is refused with a `UserError` whose
one line names the source and the fix; the main ones also through `deit-distill train`, which then exits with
status 2, prints that line and no traceback, and creates no output folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deit_distill.training.arguments import DataArguments, check_data_arguments
from deit_distill.training.checkpoints import read_json_file
from deit_distill.training.commands.cli import main as cli
from deit_distill.training.data import CorruptImageError, decode_image, load_unlabeled_images, scan_images
from deit_distill.training.errors import UserError, with_reason

ROOT = Path(__file__).resolve().parent.parent
LOGGER = "deit_distill.training.data"
# Named so that the order of first appearance, "zebra", "ant", "moth", is not the sorted order.
NAMES = ("zebra", "ant", "moth")
PER_CLASS = {"train": 4, "validation": 2}


def pixels(split: str, index: int) -> np.ndarray:
    """The image written as `index` of `split`: distinct random pixels, 6x5."""
    seed = (0 if split == "train" else 1000) + index
    return np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def reference(split: str) -> list[tuple[str, str]]:
    """`(pixel digest, class name)` of every image of `split`, as written."""
    rows = []
    for index in range(PER_CLASS[split] * len(NAMES)):
        rows.append((digest(pixels(split, index)), NAMES[index % len(NAMES)]))
    return rows


def loaded(dataset: datasets.Dataset) -> list[tuple[str, str]]:
    """`(pixel digest, class name)` of every row of a loaded split, decoded here with PIL."""
    names = dataset.features["label"].names
    stored = dataset.cast_column("image", datasets.Image(decode=False))
    rows = []
    for value, label in zip(stored["image"], stored["label"], strict=True):
        data = value["bytes"] if value["bytes"] is not None else Path(value["path"]).read_bytes()
        rows.append((digest(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))), names[label]))
    return rows


# ---------------------------------------------------------------- writers: one per format


def write_images(root: Path, split: str) -> list[Path]:
    paths = []
    for index in range(PER_CLASS[split] * len(NAMES)):
        path = root / "images" / split / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(pixels(split, index)))
        paths.append(path)
    return paths


def label_values(split: str, labels: str) -> list:
    names = [NAMES[index % len(NAMES)] for index in range(PER_CLASS[split] * len(NAMES))]
    # Class indices: the position of the name in the sorted names, which is then what the loader must name them.
    return [sorted(NAMES).index(name) for name in names] if labels == "int" else names


def records(root: Path, split: str, labels: str, paths: str) -> list[dict]:
    """Rows of a data file in `root`: image paths relative to `root` or absolute, and labels."""
    files = write_images(root, split)
    shown = [str(path.relative_to(root)) if paths == "relative" else str(path) for path in files]
    return [
        {"file": file, "category": label}
        for file, label in zip(shown, label_values(split, labels), strict=True)
    ]


def arrow_table(rows: list[dict], labels: str) -> pa.Table:
    label_type = {"int": pa.int64(), "string": pa.string(), "large_string": pa.large_string()}.get(labels)
    column = [row["category"] for row in rows]
    label = (
        pa.array(column, pa.string()).dictionary_encode()
        if labels == "categorical"
        else pa.array(column, label_type)
    )
    return pa.table({"file": pa.array([row["file"] for row in rows], pa.string()), "category": label})


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(
            file, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ","
        )
        writer.writeheader()
        writer.writerows(rows)


def single_file(kind: str):
    def write(root: Path, labels: str, paths: str) -> Path:
        rows = records(root, "train", labels, paths)
        path = root / f"labels.{kind}"
        if kind in ("csv", "tsv"):
            write_csv(path, rows)
        elif kind == "json":
            path.write_text(json.dumps(rows))
        elif kind == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            pq.write_table(arrow_table(rows, labels), path)
        return path

    return write


def folder_by_split(kind: str):
    def write(root: Path, labels: str, paths: str) -> Path:
        for split in PER_CLASS:
            rows = records(root / "data", split, labels, paths)
            if kind in ("csv", "tsv"):
                write_csv(root / "data" / f"{split}.{kind}", rows)
            else:
                pq.write_table(arrow_table(rows, labels), root / "data" / f"{split}.parquet")
        return root / "data"

    return write


def image_folder(root: Path, labels: str, paths: str) -> Path:
    for split in PER_CLASS:
        for index, name in enumerate(label_values(split, "string")):
            path = root / "photos" / split / name / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(pixels(split, index)))
    return root / "photos"


def image_bytes(layout: str):
    """A parquet file whose image column holds the PNG bytes: raw `binary`, or `{"bytes": ...}` structs."""

    def write(root: Path, labels: str, paths: str) -> Path:
        count = PER_CLASS["train"] * len(NAMES)
        data = [png(pixels("train", index)) for index in range(count)]
        images = (
            pa.array(data, pa.binary())
            if layout == "raw"
            else pa.array([{"bytes": value} for value in data], pa.struct([("bytes", pa.binary())]))
        )
        label = arrow_table([{"file": "", "category": v} for v in label_values("train", labels)], labels)[
            "category"
        ]
        root.mkdir(parents=True)
        pq.write_table(pa.table({"image": images, "category": label}), root / "images.parquet")
        return root / "images.parquet"

    return write


def saved(as_dict: bool):
    def write(root: Path, labels: str, paths: str) -> Path:
        features = datasets.Features(
            {
                "file": datasets.Value("string"),
                "category": datasets.Value("int64" if labels == "int" else labels),
            }
        )
        splits = {
            split: datasets.Dataset.from_list(
                records(root / "saved", split, labels, paths), features=features
            )
            for split in (PER_CLASS if as_dict else ["train"])
        }
        dataset = datasets.DatasetDict(splits) if as_dict else splits["train"]
        dataset.save_to_disk(str(root / "saved"))
        return root / "saved"

    return write


FORMATS = {
    "imagefolder": (image_folder, ["string"], ["none"]),
    "csv": (single_file("csv"), ["int", "string"], ["relative", "absolute"]),
    "tsv": (single_file("tsv"), ["int", "string"], ["relative"]),
    "json": (single_file("json"), ["int", "string"], ["relative", "absolute"]),
    "jsonl": (single_file("jsonl"), ["int", "string"], ["relative", "absolute"]),
    "parquet": (
        single_file("parquet"),
        ["int", "string", "large_string", "categorical"],
        ["relative", "absolute"],
    ),
    "csv folder": (folder_by_split("csv"), ["int", "string"], ["relative", "absolute"]),
    "tsv folder": (folder_by_split("tsv"), ["string"], ["relative"]),
    "parquet folder": (
        folder_by_split("parquet"),
        ["int", "string", "large_string"],
        ["relative", "absolute"],
    ),
    "save_to_disk Dataset": (
        saved(as_dict=False),
        ["int", "string", "large_string"],
        ["relative", "absolute"],
    ),
    "save_to_disk DatasetDict": (saved(as_dict=True), ["int", "string"], ["relative", "absolute"]),
    "raw image bytes": (image_bytes("raw"), ["int", "string", "large_string"], ["none"]),
    "{'bytes'} image structs": (image_bytes("struct"), ["int", "string"], ["none"]),
}
CASES = [
    pytest.param(kind, labels, paths, id=f"{kind}-{labels}-{paths}")
    for kind, (_, label_kinds, path_kinds) in FORMATS.items()
    for labels in label_kinds
    for paths in path_kinds
]


@pytest.mark.parametrize(("kind", "labels", "paths"), CASES)
def test_every_format_loads_the_images_and_labels_that_were_written(
    kind, labels, paths, tmp_path, tmp_path_factory, monkeypatch
):
    write, _, _ = FORMATS[kind]
    source = write(tmp_path / "case", labels, paths)
    # Loaded from another directory, by a path relative to it: relative image paths must follow the data file.
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    dataset = DataArguments(dataset_name=os.path.relpath(source, elsewhere)).load(
        seed=0, cache_dir=str(tmp_path / "cache")
    )

    expected_names = ["0", "1", "2"] if labels == "int" else sorted(NAMES)
    for split in dataset.values():
        assert split.column_names == ["image", "label"]
        assert split.features["label"].names == expected_names
    as_names = (lambda rows: [(d, str(sorted(NAMES).index(n))) for d, n in rows]) if labels == "int" else list
    got = {name: sorted(loaded(split)) for name, split in dataset.items()}
    has_eval_split = kind in (
        "imagefolder",
        "csv folder",
        "tsv folder",
        "parquet folder",
        "save_to_disk DatasetDict",
    )
    if has_eval_split:
        assert got == {split: sorted(as_names(reference(split))) for split in PER_CLASS}
    else:  # one split: 10% of it held out for evaluation
        assert sorted(got["train"] + got["validation"]) == sorted(as_names(reference("train")))
        assert len(got["validation"]) == round(0.1 * len(reference("train")))


@pytest.mark.parametrize(
    "kind", ["imagefolder", "csv", "parquet folder", "save_to_disk Dataset", "raw image bytes"]
)
def test_every_format_serves_unlabelled_images(kind, tmp_path, tmp_path_factory, monkeypatch):
    """Without labels (`--unlabeled_dataset`): the same sources give their images, label columns and class
    folders ignored."""
    write, _, _ = FORMATS[kind]
    source = write(tmp_path / "case", "string", "relative")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    images = load_unlabeled_images(str(source), cache_dir=str(tmp_path / "cache"))
    assert images.column_names == ["image"]
    stored = images.cast_column("image", datasets.Image(decode=False))["image"]
    got = [
        digest(np.asarray(Image.open(io.BytesIO(v["bytes"] or Path(v["path"]).read_bytes())).convert("RGB")))
        for v in stored
    ]
    assert sorted(got) == sorted(row[0] for row in reference("train"))


def test_columns_are_found_by_their_obvious_names_and_the_choice_is_logged(tmp_path, caplog):
    source = single_file("csv")(tmp_path, "string", "relative")
    with caplog.at_level("INFO", logger="deit_distill.training.data"):
        dataset = DataArguments(dataset_name=str(source)).load(seed=0, cache_dir=str(tmp_path / "cache"))
    assert len(dataset["train"]) + len(dataset["validation"]) == 12
    assert (
        f"--dataset_name {source}: reading the images from column 'file' (set --image_column" in caplog.text
    )
    assert (
        f"--dataset_name {source}: reading the labels from column 'category' (set --label_column"
        in caplog.text
    )


def test_the_one_column_beside_the_images_holds_the_labels(tmp_path, caplog):
    rows = records(tmp_path, "train", "string", "relative")
    write_csv(tmp_path / "train.csv", [{"photo": row["file"], "species": row["category"]} for row in rows])
    with caplog.at_level("INFO", logger="deit_distill.training.data"):
        dataset = DataArguments(dataset_name=str(tmp_path / "train.csv")).load(
            seed=0, cache_dir=str(tmp_path / "c")
        )
    assert dataset["train"].features["label"].names == sorted(NAMES)
    assert "reading the labels from column 'species'" in caplog.text
    (tmp_path / "two.csv").write_text(
        (tmp_path / "train.csv").read_text().replace("species", "species,size", 1)
    )
    with pytest.raises(
        UserError, match=r"no label column found among the columns \['photo', 'species', 'size'\]"
    ):
        DataArguments(dataset_name=str(tmp_path / "two.csv")).load(seed=0, cache_dir=str(tmp_path / "c"))


# The columns each writer above wrote: (images, labels).
WRITTEN_COLUMNS = {
    "imagefolder": ("image", "label"),
    "raw image bytes": ("image", "category"),
    "{'bytes'} image structs": ("image", "category"),
}


def data_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


@pytest.mark.parametrize("kind", list(FORMATS))
def test_every_automatic_column_choice_is_logged_for_every_source_kind(kind, tmp_path, caplog):
    write, label_kinds, path_kinds = FORMATS[kind]
    source = write(tmp_path / "case", label_kinds[0], path_kinds[0])
    with caplog.at_level("INFO", logger=LOGGER):
        DataArguments(dataset_name=str(source)).load(seed=0, cache_dir=str(tmp_path / "cache"))
    image, label = WRITTEN_COLUMNS.get(kind, ("file", "category"))
    lines = data_log(caplog)
    where = f"--dataset_name {source}"
    assert (
        f"{where}: reading the images from column {image!r} (set --image_column to choose another)." in lines
    )
    assert (
        f"{where}: reading the labels from column {label!r} (set --label_column to choose another)." in lines
    )
    assert not any("differ only by case" in line for line in lines)


@pytest.mark.parametrize(
    ("header", "logged"),
    [
        (
            ["image", "label", "class"],
            "reading the labels from column 'label'; column 'class' could also hold them (set --label_column "
            "class to use it).",
        ),
        (
            ["image", "label", "class", "Category"],
            "reading the labels from column 'label'; columns 'class', 'Category' could also hold them (set "
            "--label_column to one).",
        ),
        (
            ["image", "path", "label"],
            "reading the images from column 'image'; column 'path' could also hold them (set --image_column "
            "path to use it).",
        ),
    ],
)
def test_a_column_chosen_among_several_candidates_names_the_others(tmp_path, caplog, header, logged):
    """`label` (indices) beside `class` (names): the column named as its role wins, and the log says which
    others could have been chosen and how. The chosen column is the one read (indices give names "0", "1")."""
    rows = records(tmp_path, "train", "int", "relative")
    names = [NAMES[index % len(NAMES)] for index in range(len(rows))]
    files, indices = [r["file"] for r in rows], [r["category"] for r in rows]
    values = {"image": files, "path": files, "label": indices, "class": names, "Category": names}
    write_csv(
        tmp_path / "train.csv", [{column: values[column][i] for column in header} for i in range(len(rows))]
    )
    with caplog.at_level("INFO", logger=LOGGER):
        dataset = DataArguments(dataset_name=str(tmp_path / "train.csv")).load(
            seed=0, cache_dir=str(tmp_path / "c")
        )
    assert f"--dataset_name {tmp_path / 'train.csv'}: {logged}" in data_log(caplog)
    assert dataset["train"].features["label"].names == ["0", "1", "2"]


def test_the_image_column_of_unlabelled_images_is_logged(tmp_path, caplog):
    source = single_file("csv")(tmp_path, "string", "relative")
    with caplog.at_level("INFO", logger=LOGGER):
        load_unlabeled_images(str(source), cache_dir=str(tmp_path / "c"))
    assert (
        f"--unlabeled_dataset {source}: reading the images from column 'file' (set --unlabeled_image_column to "
        "choose another)." in data_log(caplog)
    )


def test_the_load_reads_no_image_unless_asked(tmp_path, monkeypatch):
    """Start-up at scale: without --verify_images (the default) loading opens no image file, not even a corrupt
    one; that one fails when it is read, naming the file."""
    source = single_file("csv")(tmp_path, "string", "absolute")
    corrupt = tmp_path / "images" / "train" / "0.png"
    corrupt.write_bytes(b"not a png")
    opened = []
    original = Image.open
    monkeypatch.setattr(
        Image, "open", lambda *args, **kwargs: opened.append(args) or original(*args, **kwargs)
    )
    dataset = DataArguments(dataset_name=str(source)).load(seed=0, cache_dir=str(tmp_path / "cache"))
    assert opened == []
    rows = datasets.concatenate_datasets([dataset["train"], dataset["validation"]])
    stored = rows.cast_column("image", datasets.Image(decode=False))["image"]
    index = next(i for i, value in enumerate(stored) if value["path"] == str(corrupt))
    with pytest.raises(CorruptImageError, match=f"file '{corrupt}'"):
        decode_image(stored[index], index)


def test_a_corrupt_image_read_in_a_worker_stays_one_line(tmp_path):
    """A data-loader worker's error comes back through torch's `ExceptionWrapper`, with the worker's traceback
    in its message; the error the command prints is still the one line naming the file."""
    from torch._utils import ExceptionWrapper

    (tmp_path / "bad.png").write_bytes(b"not a png")
    try:
        decode_image(str(tmp_path / "bad.png"), 3)
    except CorruptImageError:
        wrapper = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(CorruptImageError) as error:
        wrapper.reraise()
    assert one_line(error).startswith(f"Cannot decode image (index 3, file '{tmp_path / 'bad.png'}')")
    assert one_line(error).endswith(
        "--on_corrupt_image skip (in Python: scan_images(dataset, on_error='skip'))."
    )


# ---------------------------------------------------------------- mistakes: one line each


def load(tmp_path: Path, **arguments) -> datasets.DatasetDict:
    args = DataArguments(**arguments)
    check_data_arguments(args)
    return args.load(seed=0, cache_dir=str(tmp_path / "cache"))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def class_folders(root: Path, classes: dict[str, list[str]]) -> Path:
    """An imagefolder: `classes` maps each split to its class folders, three images in each."""
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            for index in range(3):
                (root / split / name / f"{index}.png").write_bytes(png(pixels("train", index)))
    return root


def test_a_missing_file(tmp_path):
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "data" / "train.csv"))
    assert one_line(error).startswith(
        f"--dataset_name {tmp_path / 'data' / 'train.csv'}: no such folder or file."
    )


def test_a_file_of_another_kind(tmp_path):
    (tmp_path / "notes.txt").write_text("cat.png,cat\n")
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "notes.txt"))
    assert "a .txt file, not a data file. --dataset_name takes a folder of images" in one_line(error)


def test_a_folder_of_neither_images_nor_data_files(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "readme.txt").write_text("hi")
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "folder"))
    assert "a folder with neither images nor data files (files such as readme.txt)" in one_line(error)


def test_an_empty_csv(tmp_path):
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "train.csv"))
    assert f"cannot read {tmp_path / 'train.csv'} as csv (EmptyDataError" in one_line(error)


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("train.parquet", lambda data: data[: len(data) // 2]),  # truncated
        ("train.jsonl", lambda data: b'{"image": "a.png", "label": '),  # cut mid-record
        ("train.csv", lambda data: png(pixels("train", 0))),  # an image under a data file's name
    ],
)
def test_a_damaged_data_file_is_named(tmp_path, name, damage):
    source = single_file("parquet")(tmp_path, "string", "relative")
    (tmp_path / name).write_bytes(damage(source.read_bytes()))
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / name))
    builder = {"parquet": "parquet", "jsonl": "json", "csv": "csv"}[name.split(".")[1]]
    assert one_line(error).startswith(
        f"--dataset_name {tmp_path / name}: cannot read {tmp_path / name} as {builder} ("
    )


def test_a_csv_with_a_header_only(tmp_path):
    (tmp_path / "train.csv").write_text("image,label\n")
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "train.csv"))
    assert (
        one_line(error) == f"--dataset_name {tmp_path / 'train.csv'}: {tmp_path / 'train.csv'} holds no rows."
    )


def test_a_csv_without_an_image_column(tmp_path):
    (tmp_path / "train.csv").write_text("name,label\nx,a\ny,b\n")
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "train.csv"))
    assert "no image column found among the columns ['name', 'label']; set --image_column." in one_line(error)


def test_two_candidate_image_columns(tmp_path):
    (tmp_path / "train.csv").write_text("path,file,label\nx,y,a\n")
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "train.csv"))
    assert "several columns could hold the images (path, file); set --image_column" in one_line(error)


def test_a_path_column_pointing_at_missing_files(tmp_path):
    # Paths written relative to the working directory, not to the file's folder: the usual mistake.
    source = single_file("csv")(tmp_path / "data", "string", "relative")
    source.write_text(source.read_text().replace("images/", "data/images/"))
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(source))
    message = one_line(error)
    assert (
        f"none of the 12 image files checked in the train split exists, e.g. '{tmp_path}/data/data/images/"
        in message
    )
    assert "Relative paths are read against the folder of the data file" in message


def test_a_damaged_save_to_disk_folder(tmp_path):
    source = saved(as_dict=True)(tmp_path, "string", "absolute")
    for arrow in source.glob("train/*.arrow"):
        arrow.write_bytes(b"truncated")
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(source))
    assert f"--dataset_name {source}: cannot read this save_to_disk folder (" in one_line(error)


def test_a_single_class_folder_is_not_told_to_set_the_label_column(tmp_path):
    root = class_folders(tmp_path / "cats", {".": ["cat"]})
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(root))
    message = one_line(error)
    assert "one class folder (cat); a classifier needs at least two classes" in message
    assert "--label_column" not in message


def test_a_single_class_in_a_csv(tmp_path):
    rows = records(tmp_path, "train", "string", "relative")
    write_csv(tmp_path / "train.csv", [{**row, "category": "cat"} for row in rows])
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "train.csv"))
    assert "the training split has one class (cat); a classifier needs at least two" in one_line(error)


def test_a_class_only_in_the_validation_folder_is_refused_unless_kept(tmp_path, caplog):
    root = class_folders(tmp_path / "pets", {"train": ["cat", "dog"], "validation": ["cat", "dog", "fox"]})
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(root))
    assert (
        "1 of 3 classes have no training image: fox (in the eval split only). Their outputs would never train"
        in one_line(error)
    )
    assert "--allow_classes_without_training_images true" in str(error.value)

    with caplog.at_level("WARNING"):
        dataset = load(tmp_path, dataset_name=str(root), allow_classes_without_training_images=True)
    assert dataset["train"].features["label"].names == ["cat", "dog", "fox"]
    assert sorted(set(dataset["validation"]["label"])) == [0, 1, 2]
    assert (
        f"--dataset_name {root}: 1 of 3 classes have no training image: fox (in the eval split only); kept "
        "(--allow_classes_without_training_images true)." in caplog.text
    )


def test_class_indices_without_training_images(tmp_path):
    rows = records(tmp_path, "train", "int", "relative")
    write_csv(tmp_path / "train.csv", [{**row, "category": 2 * row["category"]} for row in rows])  # 0, 2, 4
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "train.csv"))
    assert "2 of 5 classes have no training image: 1, 3." in one_line(error)


@pytest.mark.parametrize("labels", ["string", "int"])
def test_eval_labels_unknown_to_training(tmp_path, labels):
    for split in PER_CLASS:
        rows = records(tmp_path / "data", split, labels, "relative")
        if split == "validation":
            rows[0]["category"] = "lion" if labels == "string" else 7
        write_csv(tmp_path / "data" / f"{split}.csv", rows)
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(tmp_path / "data"))
    unknown = "lion" if labels == "string" else "7"
    assert f"the eval split has 1 label(s) the training split does not have: {unknown}." in one_line(error)


def labelled_csv(root: Path, labels: list[str]) -> Path:
    """`root/train.csv`: one distinct image per label, in `root/images`, with the labels exactly as given."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, label in enumerate(labels):
        (root / f"{index}.png").write_bytes(png(pixels("train", index)))
        rows.append({"image": f"{index}.png", "label": label})
    write_csv(root / "train.csv", rows)
    return root / "train.csv"


def step_that_drops_images(tmp_path: Path, step: str) -> tuple[Path, dict, str, str]:
    """A source, the flags of a step that drops training images, how the message names the step, and its fix."""
    if step == "held-out split":  # three classes of one image; half of them held out: two classes lose theirs
        source = labelled_csv(tmp_path / "data", ["circle", "square", "star"])
        return (
            source,
            {"eval_fraction": 0.5},
            "holding out 50% of the train split for evaluation (there is no eval split; --eval_fraction 0.5)",
            "add images of them (a class needs two to be in both splits), or name an eval split with --eval_split",
        )
    root = class_folders(
        tmp_path / "pets", {"train": ["cat", "dog", "fox"], "validation": ["cat", "dog", "fox"]}
    )
    if step == "--max_train_samples":  # two images cannot hold three classes
        return (
            root,
            {"max_train_samples": 2},
            "--max_train_samples 2",
            "raise --max_train_samples (2 images cannot hold 3 classes; the subset keeps each class's share of the "
            "images, so a small class needs a larger subset)",
        )
    for path in (root / "train" / "cat").iterdir():  # every training image of "cat" corrupt
        path.write_bytes(b"not an image")
    return (
        root,
        {"on_corrupt_image": "skip"},
        "--on_corrupt_image skip (it dropped 3 undecodable images)",
        "replace their corrupt images",
    )


@pytest.mark.parametrize("step", ["held-out split", "--max_train_samples", "--on_corrupt_image skip"])
def test_a_step_that_leaves_a_class_without_training_images_is_named(tmp_path, caplog, step):
    """After every step that drops training images, a class left without one is refused in one line naming the
    step and its fix, or kept with a warning under --allow_classes_without_training_images. The classes it names
    are those the kept dataset's training labels lack."""
    source, flags, named, fix = step_that_drops_images(tmp_path, step)
    with caplog.at_level("WARNING", logger=LOGGER):
        kept = load(tmp_path, dataset_name=str(source), allow_classes_without_training_images=True, **flags)
    names = kept["train"].features["label"].names
    present = set(kept["train"]["label"])
    lost = [name for index, name in enumerate(names) if index not in present]
    assert len(lost) == (2 if step == "held-out split" else 1)
    if step == "--on_corrupt_image skip":
        assert lost == ["cat"]
    problem = f"{named} left no training image of {len(lost)} of {len(names)} classes: {', '.join(lost)}"
    where = f"--dataset_name {source}"
    assert f"{where}: {problem}; kept (--allow_classes_without_training_images true)." in data_log(caplog)

    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(source), **flags)
    assert one_line(error) == (
        f"{where}: {problem}. Their outputs would never train; {fix}, or keep them with "
        "--allow_classes_without_training_images true."
    )


def test_a_held_out_split_of_no_image_is_refused(tmp_path):
    source = labelled_csv(tmp_path, ["circle", "square", "circle", "square"])  # 10% of 4 rounds to none
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(source))
    assert one_line(error) == (
        f"--dataset_name {source}: there is no eval split, and --eval_fraction 0.1 of the 4 training images holds "
        "out none to evaluate on; raise --eval_fraction, add images, or name an eval split with --eval_split."
    )


def test_class_names_that_differ_only_by_case_or_spaces_stay_apart_with_a_warning(tmp_path, caplog):
    """Labels are read as written, surrounding spaces included, as Python's csv module (RFC 4180) reads the cell;
    names that differ only by case or spaces are separate classes, named in one warning."""
    labels = ["circle", "circle ", "Square", "square", " star"] * 2
    source = labelled_csv(tmp_path, labels)
    with source.open(newline="") as file:
        as_written = sorted({row["label"] for row in csv.DictReader(file)})
    with caplog.at_level("WARNING", logger=LOGGER):
        dataset = load(tmp_path, dataset_name=str(source))
    assert dataset["train"].features["label"].names == as_written == sorted(set(labels))
    where = f"--dataset_name {source}"
    assert data_log(caplog) == [
        f"{where}: class names that differ only by case or surrounding spaces are separate classes: 'Square' and "
        "'square'; 'circle' and 'circle '. If they are one class, give them one spelling in the labels.",
        f"{where}: class names with surrounding spaces, kept as written: ' star' (a CSV written with \", \" between "
        "cells has them).",
    ]


def test_unlabelled_images_are_not_asked_for_class_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as error:
        load_unlabeled_images(str(tmp_path / "empty"))
    message = one_line(error)
    assert message.startswith(
        f"--unlabeled_dataset {tmp_path / 'empty'}: a folder with neither images nor data files (no files). "
        "--unlabeled_dataset takes a folder of images (flat or in sub-folders, whose names are ignored), "
    )
    assert "per class" not in message
    (tmp_path / "notes.txt").write_text("a.png\n")
    with pytest.raises(UserError) as error:
        check_data_arguments(
            DataArguments(dataset_name="fashion_mnist", unlabeled_dataset=str(tmp_path / "notes.txt"))
        )
    assert "a folder of images (flat or in sub-folders, whose names are ignored)" in one_line(error)
    assert "per class" not in one_line(error)


def test_library_reasons_join_our_messages_without_doubled_words_or_marks(tmp_path):
    """json's "Invalid control character at" is followed by our "at line 1", PIL's "... DOS attack." by our
    ". Remove": one word, one full stop."""
    path = tmp_path / "config.json"
    path.write_text('{"a": "\x01"}')
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(path.read_text())
    assert (
        parsed.value.msg == "Invalid control character at"
    )  # json's own words, as the message receives them
    with pytest.raises(UserError) as error:
        read_json_file(path, "--model_name_or_path")
    assert one_line(error) == (
        f"--model_name_or_path: {path} is not valid JSON (Invalid control character at line 1); the file is "
        "damaged."
    )
    assert with_reason("(", "Expecting value", " at line 1).") == "(Expecting value at line 1)."
    assert with_reason("x: ", "attack.", ". Remove it.") == "x: attack. Remove it."
    assert with_reason("x (", ValueError(""), ").") == "x (no detail)."
    assert with_reason("x (", "first\nsecond", ").") == "x (first)."


def test_every_image_corrupt_with_skip(tmp_path):
    source = single_file("csv")(tmp_path, "string", "relative")
    for path in (tmp_path / "images" / "train").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(UserError) as error:
        load(tmp_path, dataset_name=str(source), on_corrupt_image="skip")
    assert one_line(error) == (
        f"--dataset_name {source}: all 11 images of the train split are corrupt (--on_corrupt_image skip dropped "
        "every one); check that the files are images."
    )


def test_skip_scans_without_verify_images_and_drops_only_the_bad_image(tmp_path, caplog):
    source = single_file("csv")(tmp_path, "string", "relative")
    (tmp_path / "images" / "train" / "4.png").write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        dataset = load(tmp_path, dataset_name=str(source), on_corrupt_image="skip")
    assert len(dataset["train"]) + len(dataset["validation"]) == 11
    assert "Skipped 1 undecodable images" in caplog.text
    kept = set(loaded(datasets.concatenate_datasets([dataset["train"], dataset["validation"]])))
    assert kept == set(reference("train")) - {reference("train")[4]}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, expected here
def test_an_image_over_the_pixel_limit_is_corrupt_and_skipped(tmp_path, monkeypatch):
    root = class_folders(tmp_path / "pets", {".": ["cat", "dog"]})
    big = np.zeros((12, 12, 3), np.uint8)  # 144 pixels: over the limit of 100 (PIL warns), and over twice 60
    (root / "cat" / "big.png").write_bytes(png(big))
    dataset = load(tmp_path, dataset_name=str(root))
    train = datasets.concatenate_datasets([dataset["train"], dataset["validation"]])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(CorruptImageError, match=rf"file '{root / 'cat' / 'big.png'}'.*over PIL's limit"):
        scan_images(train, on_error="raise")
    clean, skipped = scan_images(train, on_error="skip")
    assert (skipped, len(clean)) == (1, 6)
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 60
    )  # over twice the limit: PIL's own DecompressionBombError
    with pytest.raises(
        CorruptImageError, match=rf"file '{root / 'cat' / 'big.png'}'.*DecompressionBombError"
    ) as error:
        scan_images(train, on_error="raise")
    # PIL's reason ends with its own full stop ("... DOS attack."): ours follows it without a second one.
    assert "decompression bomb DOS attack. Remove or replace it" in one_line(error)
    assert ".." not in one_line(error).replace("...", "")


# ---------------------------------------------------------------- through the command line

TINY = [
    "--config_overrides", "patch_size=8,hidden_size=16,num_hidden_layers=1,num_attention_heads=2",
    "--image_size", "16",
    "--max_steps", "1",
    "--per_device_train_batch_size", "4",
    "--distillation_type", "none",
    "--use_cpu", "true",
    "--report_to", "none",
    "--save_strategy", "no",
    "--disable_tqdm", "true",
]  # fmt: skip


def mistakes(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Flags of a mistaken `train`, and the part of its one line that names the mistake."""
    single = class_folders(tmp_path / "cats", {".": ["cat"]})
    only_in_eval = class_folders(
        tmp_path / "pets", {"train": ["cat", "dog"], "validation": ["cat", "dog", "fox"]}
    )
    corrupt = single_file("csv")(tmp_path / "corrupt", "string", "relative")
    for path in (tmp_path / "corrupt" / "images" / "train").iterdir():
        path.write_bytes(b"not an image")
    dropping = {
        name: step_that_drops_images(tmp_path / name, step)
        for name, step in (("subset", "--max_train_samples"), ("skip", "--on_corrupt_image skip"))
    }
    dropping_flags = {
        name: [
            "--dataset_name",
            str(source),
            *(f for key, value in flags.items() for f in (f"--{key}", str(value))),
        ]
        for name, (source, flags, _, _) in dropping.items()
    }
    return {
        "missing file": (["--dataset_name", str(tmp_path / "data/train.csv")], "no such folder or file"),
        "subset leaves a class out": (
            dropping_flags["subset"],
            "--max_train_samples 2 left no training image of 1 of 3 classes",
        ),
        "skip leaves a class out": (
            dropping_flags["skip"],
            "--on_corrupt_image skip (it dropped 3 undecodable images) left no training image of 1 of 3 classes: cat",
        ),
        "single class folder": (["--dataset_name", str(single)], "one class folder (cat)"),
        "class only in eval": (["--dataset_name", str(only_in_eval)], "have no training image: fox"),
        "all corrupt, skip": (
            ["--dataset_name", str(corrupt), "--on_corrupt_image", "skip"],
            "all 11 images of the train split are corrupt",
        ),
    }


@pytest.mark.parametrize(
    "mistake",
    [
        "missing file",
        "single class folder",
        "class only in eval",
        "all corrupt, skip",
        "subset leaves a class out",
        "skip leaves a class out",
    ],
)
def test_train_refuses_the_mistake_in_one_line_before_writing(tmp_path, capsys, mistake):
    flags, named = mistakes(tmp_path)[mistake]
    output_dir = tmp_path / "run"
    assert cli(["train", *TINY, *flags, "--output_dir", str(output_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deit-distill: error: --dataset_name ") and named in err[-1], err
    assert not any(line.startswith("Traceback") for line in err)
    assert not output_dir.exists()


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deit_distill.training.commands.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["single class folder", "all corrupt, skip"])
def test_a_train_process_exits_with_one_line_and_no_traceback(tmp_path, mistake):
    flags, named = mistakes(tmp_path)[mistake]
    result = run_cli(["train", *TINY, *flags, "--output_dir", str(tmp_path / "run")], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("deit-distill: error: ")
    assert named in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_readme_csv_example_trains_and_evaluates_from_another_directory(tmp_path):
    """The README's CSV command as written (`data/train.csv` of paths relative to it and string labels), with
    tiny-model flags for its "...", then `eval RUN_DIR` from another working directory."""
    line = next(
        line for line in (ROOT / "README.md").read_text().splitlines() if "data/train.csv ..." in line
    )
    command = shlex.split(line.split("#")[0])
    assert command[:2] == ["deit-distill", "train"] and command[-1] == "..."
    project = tmp_path / "project"
    rows = records(project / "data", "train", "string", "relative")
    write_csv(project / "data" / "train.csv", [{"filepath": r["file"], "label": r["category"]} for r in rows])
    trained = run_cli([*command[1:-1], *TINY, "--output_dir", "runs/csv"], cwd=project)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = project / "runs" / "csv"
    evaluated = run_cli(["eval", str(run_dir)], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((run_dir / "config.json").read_text())["id2label"] == {
        "0": "ant",
        "1": "moth",
        "2": "zebra",
    }
