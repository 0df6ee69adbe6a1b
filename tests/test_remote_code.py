"""A saved model loads with `trust_remote_code=True` alone, in a process where this project is not importable."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    attach_pipeline,
    build_image_processor,
)

LABELS = ["cat", "dog", "bird", "fish", "frog"]

# Runs with cwd = the saved model dir. The venv installs this project in editable mode, so its finder and the
# repo root are removed first, and the child proves the project cannot be imported before loading anything.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, os, sys

    repo = os.path.realpath(sys.argv[1])
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
    # The cwd goes too: its modeling_deit_distill.py is the saved copy, loaded below through the Hub machinery.
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") not in (repo, os.getcwd())]
    sys.path_importer_cache.clear()
    for name in ("modeling_deit_distill", "training"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable"

    import torch
    from transformers import AutoModelForImageClassification, pipeline

    model = AutoModelForImageClassification.from_pretrained(".", trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        torch.save(model(torch.load("pixels.pt")).logits, "child_logits.pt")

    from PIL import Image

    classifier = pipeline("image-classification", model=".", trust_remote_code=True)
    assert type(classifier).__module__.startswith("transformers_modules"), type(classifier).__module__
    image = Image.open("image.png")
    inputs = {"path": "image.png", "RGB": image, "L": image.convert("L"), "RGBA": image.convert("RGBA"),
              "P": image.convert("P")}
    results = {name: classifier(value) for name, value in inputs.items()}
    with open("pipeline.json", "w") as f:
        json.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, DeiTDistillForImageClassification]:
    directory = tmp_path_factory.mktemp("remote")
    config = DeiTDistillConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    model = DeiTDistillForImageClassification(config).eval()
    model.save_pretrained(directory)
    build_image_processor(config).save_pretrained(directory)
    attach_pipeline(directory)  # as training saves it
    return directory, model


def test_saved_code_imports_only_torch_transformers_and_siblings(saved):
    directory, _ = saved
    files = sorted(p.name for p in directory.glob("*.py"))
    shipped = {"configuration_deit_distill.py", "modeling_deit_distill.py", "pipeline_deit_distill.py"}
    assert shipped <= set(files)
    assert "convert_deit_distill.py" not in files  # conversion is a tool, not part of the shipped model
    for name in files:
        allowed = {"torch", "transformers", *sys.stdlib_module_names}
        if name == "pipeline_deit_distill.py":
            allowed |= {"PIL", "numpy"}  # what transformers' image pipelines need anyway
        for node in ast.walk(ast.parse((directory / name).read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{name} imports {roots}"


def test_fresh_process_loads_model_and_pipeline_with_remote_code_only(saved):
    directory, model = saved
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, directory / "pixels.pt")
    Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8).numpy()).save(
        directory / "image.png"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(directory / "modules")}
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(repo)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    with torch.no_grad():
        expected = model(pixels).logits
    torch.testing.assert_close(torch.load(directory / "child_logits.pt"), expected, atol=1e-6, rtol=1e-6)

    results = json.loads((directory / "pipeline.json").read_text())
    processor = build_image_processor(model.config)
    with torch.no_grad():
        probabilities = model(
            **processor(Image.open(directory / "image.png"), return_tensors="pt")
        ).logits.softmax(-1)
    top = probabilities[0].argsort(descending=True)
    for name in ("path", "RGB"):
        assert [r["label"] for r in results[name]] == [LABELS[i] for i in top]
        torch.testing.assert_close(torch.tensor([r["score"] for r in results[name]]), probabilities[0, top])
    for name in ("L", "RGBA", "P"):
        assert sorted(r["label"] for r in results[name]) == sorted(LABELS)
