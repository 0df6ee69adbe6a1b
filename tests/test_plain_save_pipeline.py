"""A model saved with a plain `save_pretrained` carries the project's pipeline (no `attach_pipeline` call), and the
transformers-native copy stays free of remote code. Checked in a clean interpreter where the project cannot be
imported, as a user of the saved folder or pushed repo would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    to_transformers_deit,
)

ROOT = Path(__file__).resolve().parents[1]
# The project made unimportable (as in test_pixel_parity.py): the editable finder, the repository and the cwd
# are removed from the import system, and the child proves it.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, os, sys

    args = json.loads(sys.argv[1])
    repo = os.path.realpath(args["repo"])
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") not in (repo, os.getcwd())]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("deit_distill") is None, "the project is importable"

    import torch
    from transformers import pipeline

    remote = pipeline("image-classification", model=args["plain"], trust_remote_code=True)
    native = pipeline("image-classification", model=args["native"])
    received = []
    remote.model.register_forward_pre_hook(
        lambda module, inputs, kwargs: received.append(kwargs["pixel_values"][0].clone()), with_kwargs=True
    )
    predictions = remote(args["image"])
    print(json.dumps({
        "remote_pipeline": type(remote).__module__ + "." + type(remote).__name__,
        "native_pipeline": type(native).__module__ + "." + type(native).__name__,
        "labels": [p["label"] for p in predictions],
        "first_pixel": received[0][:, 0, 0].tolist(),
        "native_labels": [p["label"] for p in native(args["image"])],
    }))
    """
)


def test_plain_save_pretrained_ships_the_pipeline_and_the_native_copy_stays_native(tmp_path):
    labels = ["ant", "bee", "cat"]
    config = DeiTDistillConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_labels=3, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = DeiTDistillForImageClassification(config).eval()
    plain, native = tmp_path / "plain", tmp_path / "native"
    model.save_pretrained(plain)  # nothing else: no attach_pipeline, no processor saved by hand
    to_transformers_deit(model).save_pretrained(native)
    DeiTDistillForImageClassification.from_pretrained(plain)  # reads back
    (native / "preprocessor_config.json").write_bytes((plain / "preprocessor_config.json").read_bytes())

    saved = json.loads((plain / "config.json").read_text())
    assert saved["custom_pipelines"]["image-classification"]["impl"] == (
        "pipeline_deit_distill.DeiTDistillImageClassificationPipeline"
    )
    assert (plain / "pipeline_deit_distill.py").is_file()
    native_config = json.loads((native / "config.json").read_text())
    assert "custom_pipelines" not in native_config and "auto_map" not in native_config
    assert not list(native.glob("*.py"))

    # A 16-bit image: the project's pipeline rescales it (65535 -> 255); transformers' own would saturate it.
    image = tmp_path / "grey16.png"
    Image.fromarray(np.full((40, 40), 25700, np.uint16)).save(image)
    arguments = {"repo": str(ROOT), "plain": str(plain), "native": str(native), "image": str(image)}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(arguments)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["remote_pipeline"].startswith("transformers_modules.")
    assert result["remote_pipeline"].endswith("pipeline_deit_distill.DeiTDistillImageClassificationPipeline")
    assert (
        result["native_pipeline"] == "transformers.pipelines.image_classification.ImageClassificationPipeline"
    )
    assert set(result["labels"]) <= set(labels) and set(result["native_labels"]) <= set(labels)
    processor = json.loads((plain / "preprocessor_config.json").read_text())
    mean, std = np.array(processor["image_mean"]), np.array(processor["image_std"])
    expected = (100 / 255 - mean) / std  # 25700 / 257 = 100, the 8-bit level
    np.testing.assert_allclose(result["first_pixel"], expected, atol=1e-5)
