"""A teacher cache is reused only where it replays its own views: `teacher_cache.json` records the versions of
every library that shapes a view and a hash of the first batches' pixels; a run whose pixels hash differently is
refused naming the fields, and a run on other versions whose pixels hash equal is allowed and says so."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy
import PIL
import pytest
import torch
import torchvision
from test_teacher_cache import FULL, RUN
from test_teacher_cache import teacher as teacher

from deit_distill.training.commands.cache_teacher import main as cache_teacher
from deit_distill.training.commands.train import main as train
from deit_distill.training.errors import UserError
from deit_distill.training.teacher_cache import METADATA_FILE, PIXEL_CHECK_BATCHES
from deit_distill.training.trainer import DistillationTrainer

SHORT = ["--max_steps", str(PIXEL_CHECK_BATCHES), "--logging_steps", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher):
    path = tmp_path_factory.mktemp("reuse") / "cache"
    cache_teacher([*RUN, "--teacher", str(teacher), "--teacher_cache", str(path), *FULL])
    return path


def edited_copy(cache: Path, folder: Path, **changes: dict) -> Path:
    """A copy of the cache whose metadata sections are updated with `changes`."""
    copy = Path(shutil.copytree(cache, folder / "cache"))
    metadata = json.loads((copy / METADATA_FILE).read_text())
    for section, values in changes.items():
        metadata[section] = {**metadata[section], **values}
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    return copy


def test_the_cache_records_the_versions_of_everything_that_shapes_a_view(cache):
    versions = json.loads((cache / METADATA_FILE).read_text())["versions"]
    import datasets
    import timm
    import transformers

    assert versions == {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "Pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "deit-distill": version("deit-distill"),
    }


def test_the_pixel_hash_is_that_of_the_batches_training_sees(cache, teacher, tmp_path, monkeypatch):
    seen = []
    compute_loss = DistillationTrainer.compute_loss

    def record(trainer, model, inputs, *args, **kwargs):
        if model.training:
            seen.append((inputs["pixel_values"].clone(), inputs["labels"].clone()))
        return compute_loss(trainer, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "compute_loss", record)
    train([*RUN, *SHORT, "--teacher", str(teacher), "--output_dir", str(tmp_path / "live")])
    digest = (
        hashlib.sha256()
    )  # the hash as its docstring defines it, from the batches the live run trained on
    for pixels, labels in seen[:PIXEL_CHECK_BATCHES]:
        for tensor in (pixels, labels):
            digest.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    pixels = json.loads((cache / METADATA_FILE).read_text())["pixels"]
    assert pixels == {"batches": PIXEL_CHECK_BATCHES, "sha256": digest.hexdigest()}


def test_other_versions_with_equal_pixels_are_allowed_and_said_so(cache, tmp_path, caplog):
    other = edited_copy(cache, tmp_path, versions={"timm": "0.0.1"})
    with caplog.at_level(logging.INFO, logger="deit_distill.training.teacher_cache"):
        train([*RUN, *SHORT, "--teacher_cache", str(other), "--output_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "model.safetensors").is_file()
    lines = [r.getMessage() for r in caplog.records if "other library versions" in r.getMessage()]
    assert len(lines) == 1
    assert f"versions.timm: '0.0.1' in the cache, '{version('timm')}' here" in lines[0]
    assert "pixels hash equal" in lines[0]


@pytest.mark.parametrize("versions", [{"timm": "0.0.1"}, {}], ids=["other-timm", "same-versions"])
def test_other_pixels_are_refused_naming_the_fields(cache, tmp_path, versions):
    other = edited_copy(cache, tmp_path, versions=versions, pixels={"sha256": "0" * 64})
    with pytest.raises(UserError) as raised:
        train([*RUN, *SHORT, "--teacher_cache", str(other), "--output_dir", str(tmp_path / "run")])
    message = str(raised.value)
    assert "pixels.sha256: '" + "0" * 64 + "' in the cache" in message
    assert ("versions.timm: '0.0.1' in the cache" in message) is bool(versions)
    assert not (tmp_path / "run" / "model.safetensors").exists()
