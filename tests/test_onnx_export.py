"""ONNX export (`deit-distill export`), int8 quantization and the pipeline-shaped ONNX Runtime runner.

References are independent of the code under test: PyTorch's own forward for the exported graph; for the runner,
the PyTorch model's softmax on pixels checked against a PIL/NumPy resize and normalisation written here (and
`pipeline("image-classification")` on the saved model); for the int8 figures, each ONNX file run here on the run's
evaluation split and the PyTorch model's top-1 from `deit-distill eval`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, ResNetConfig, ResNetForImageClassification, pipeline

from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    DeiTDistillImageClassificationPipeline,
    build_image_processor,
)
from deit_distill.modeling_deit_distill.pipeline_deit_distill import to_rgb
from deit_distill.training.commands.cli import main as cli
from deit_distill.training.onnx_export import export_onnx
from deit_distill.training.run_record import RunRecord

ort = pytest.importorskip("onnxruntime")

TINY = {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_labels": 5}


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "vit":  # no distillation token, non-square input
        config = DeiTDistillConfig(
            image_size=(32, 24), use_distillation_token=False, inference_head="cls", **TINY
        )
    elif kind == "distilled":
        config = DeiTDistillConfig(image_size=40, **TINY)
    else:  # a convnet teacher, as `train --architecture resnet` makes
        config = ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
        )
        config.image_size = 32
        return ResNetForImageClassification(config).eval()
    return DeiTDistillForImageClassification(config).eval()


@pytest.mark.parametrize(("kind", "heads"), [("vit", False), ("distilled", True), ("resnet", False)])
def test_exported_graph_computes_the_pytorch_outputs_at_two_batch_sizes(kind, heads, tmp_path):
    model = build(kind)
    processor = build_image_processor(model.config, crop_pct=1.0)
    report = export_onnx(model, processor, tmp_path, heads=heads)

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    names = [o.name for o in session.get_outputs()]
    assert names == report.outputs == ["logits", *(["cls_logits", "distillation_logits"] if heads else [])]
    assert (tmp_path / "config.json").is_file() and (tmp_path / "preprocessor_config.json").is_file()
    for batch in (1, 4):  # the graph was traced at 2: the batch dimension must be dynamic
        pixels = torch.randn(batch, *report.input_shape)
        with torch.no_grad():
            expected = model(pixel_values=pixels)
        for name, value in zip(names, session.run(None, {"pixel_values": pixels.numpy()}), strict=True):
            np.testing.assert_allclose(value, expected[name].numpy(), rtol=1e-4, atol=1e-5)


def test_heads_are_refused_for_a_model_without_distillation_token(tmp_path):
    model = build("vit")
    with pytest.raises(ValueError, match="no distillation token"):
        export_onnx(model, build_image_processor(model.config), tmp_path, heads=True)


def image_inputs(folder: Path) -> list:
    """Paths and opened PIL images of several modes, as users pass them."""
    rng = np.random.default_rng(0)
    rgb = folder / "rgb.png"
    Image.fromarray(rng.integers(0, 255, (50, 37, 3), dtype=np.uint8)).save(rgb)
    grey = folder / "grey.jpg"
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(grey)
    rgba = Image.fromarray(rng.integers(0, 255, (33, 33, 4), dtype=np.uint8))
    sixteen_bit = Image.fromarray(rng.integers(0, 65536, (28, 28), dtype=np.uint16))
    return [str(rgb), str(grey), rgba, sixteen_bit]


def assert_same_predictions(got: list[dict], want: list[dict]) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-5)


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's tiny distilled model exported by the command, with a dynamic int8 copy."""
    out = tmp_path_factory.mktemp("exported")
    assert cli(["export", str(tiny_model_dir), "--output", str(out), "--quantize", "int8"]) == 0
    return out


def test_runner_returns_the_pipelines_labels_and_scores_on_the_same_images(
    exported, tiny_model_dir, tmp_path
):
    from deit_distill.modeling_deit_distill.onnx_classifier import OnnxImageClassifier

    images = image_inputs(tmp_path)
    classifier = pipeline(
        "image-classification",
        model=str(tiny_model_dir),
        trust_remote_code=True,
        pipeline_class=DeiTDistillImageClassificationPipeline,
    )
    runner = OnnxImageClassifier.from_pretrained(exported)

    # The same pixels reach both models.
    fed = []
    hook = classifier.model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(kwargs["pixel_values"]), with_kwargs=True
    )
    expected = [classifier(image, top_k=3) for image in images]
    hook.remove()
    np.testing.assert_array_equal(runner.preprocess(images), torch.cat(fed).numpy())

    for got, want in zip(runner(images, top_k=3), expected, strict=True):
        assert_same_predictions(got, want)
    assert_same_predictions(runner(images[0]), runner(images, top_k=5)[0])  # one image: one list

    # Against the PyTorch model itself: the runner's pixels of a smooth RGB image are a bicubic resize to 32x32
    # and the processor's normalisation (PIL/NumPy here; PIL and torchvision round a level apart), and its scores
    # are the softmax of the PyTorch model's logits on the pixels it computes.
    y, x = np.mgrid[0:50, 0:37]
    smooth = np.stack([x * 6, y * 5, (x + y) * 3], axis=-1).astype(np.uint8)
    mean, std = np.array(runner.image_processor.image_mean), np.array(runner.image_processor.image_std)
    resized = np.asarray(Image.fromarray(smooth).resize((32, 32), Image.Resampling.BICUBIC), np.float64) / 255
    reference = ((resized - mean) / std).transpose(2, 0, 1)
    levels = np.abs(runner.preprocess([Image.fromarray(smooth)])[0] - reference) * std[:, None, None] * 255
    assert levels.max() <= 1.0 + 1e-4 and levels.mean() < 0.5
    pixels = runner.preprocess(images)
    model = DeiTDistillForImageClassification.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        probabilities = model(pixel_values=torch.from_numpy(pixels)).logits.softmax(-1)
    for got, row in zip(runner(images, top_k=3), probabilities, strict=True):
        top = row.topk(3)
        assert [p["label"] for p in got] == [model.config.id2label[int(i)] for i in top.indices]
        assert [p["score"] for p in got] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_int8_export_is_smaller_and_runs(exported):
    int8 = exported / "model_int8.onnx"
    assert int8.stat().st_size < (exported / "model.onnx").stat().st_size
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    report = json.loads((exported / "onnx_export.json").read_text())
    logits = session.run(None, {"pixel_values": np.zeros((2, *report["input_shape"]), np.float32)})[0]
    assert logits.shape[0] == 2 and np.isfinite(logits).all()
    assert report["int8"]["mode"] == "dynamic" and set(report["max_difference"]) == {"1", "3"}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_of_a_run_reports_top1_of_both_on_its_evaluation_split(mode, tmp_path, capsys):
    run = tmp_path / "run"
    classes = ["bird", "cat", "dog", "fish", "frog"]  # the image folder's label order
    config = DeiTDistillConfig(
        image_size=32, **{**TINY, "num_labels": 5}, id2label=dict(enumerate(classes)),
        label2id={name: i for i, name in enumerate(classes)},
    )  # fmt: skip
    torch.manual_seed(0)
    DeiTDistillForImageClassification(config).save_pretrained(run)
    build_image_processor(config, crop_pct=1.0).save_pretrained(run)
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label in classes:  # 4 images a class, half held out for evaluation
        (data / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / label / f"{i}.png")
    RunRecord(data={"dataset_name": str(data), "eval_fraction": 0.5, "seed": 0}).write(run)

    args = ["export", str(run), "--output", str(tmp_path / "out"), "--quantize", "int8", "--int8_mode", mode]
    assert cli(args) == 0
    assert "top-1 on the run's evaluation split (10 images)" in capsys.readouterr().out
    measured = json.loads((tmp_path / "out" / "onnx_export.json").read_text())["int8"]
    assert measured["mode"] == mode and measured["num_images"] == 10

    # The reference: the run's evaluation split as `eval` reads it, each ONNX file run here on the saved
    # processor's pixels, and the PyTorch model's own top-1 from `deit-distill eval`.
    record = RunRecord.read(run)
    split = record.data_arguments().load(seed=record.seed, unlabeled=False)["validation"]
    processor = AutoImageProcessor.from_pretrained(run)
    pixels = processor(images=[to_rgb(image) for image in split["image"]], return_tensors="np")[
        "pixel_values"
    ]
    labels = np.array(split["label"])
    predicted = {
        name: ort.InferenceSession(str(tmp_path / "out" / file), providers=["CPUExecutionProvider"])
        .run(["logits"], {"pixel_values": pixels.astype(np.float32)})[0]
        .argmax(-1)
        for name, file in (("fp32", "model.onnx"), ("int8", "model_int8.onnx"))
    }
    assert measured["int8_top1"] == pytest.approx(100 * (predicted["int8"] == labels).mean())
    assert measured["agreement"] == pytest.approx(100 * (predicted["int8"] == predicted["fp32"]).mean())
    capsys.readouterr()
    assert cli(["eval", str(run)]) == 0
    pytorch_top1 = json.loads(capsys.readouterr().out)["eval_avg_top1"]
    assert 100 * (predicted["fp32"] == labels).mean() == pytest.approx(100 * pytorch_top1)


def test_predict_onnx_prints_the_runners_predictions(exported, tmp_path, capsys):
    from deit_distill.modeling_deit_distill.onnx_classifier import OnnxImageClassifier

    paths = [p for p in image_inputs(tmp_path) if isinstance(p, str)]
    capsys.readouterr()
    assert cli(["predict", str(exported), "--onnx", *paths, "--json", "--top_k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    runner = OnnxImageClassifier.from_pretrained(exported)
    assert [line["file"] for line in lines] == paths
    for line, want in zip(lines, runner(paths, top_k=2), strict=True):
        assert_same_predictions(line["predictions"], want)
    assert cli(["predict", str(exported), "--onnx", "--onnx_file", "model_int8.onnx", paths[0]]) == 0


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deit-distill: error: "), err
    return err[0]


def test_bad_inputs_give_one_clear_line(exported, tiny_model_dir, tmp_path, monkeypatch, capsys):
    assert cli(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "no such run, model folder or file" in one_error_line(capsys)
    assert cli(["predict", str(tmp_path), "--onnx", "x.png"]) == 2
    assert "has no model.onnx" in one_error_line(capsys)
    static = ["--quantize", "int8", "--int8_mode", "static"]
    # A saved model without a run record: static int8 has no training images to calibrate on.
    assert cli(["export", str(tiny_model_dir), "--output", str(tmp_path / "out"), *static]) == 2
    assert "is not a training run" in one_error_line(capsys)

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    assert cli(["export", str(tiny_model_dir), "--output", str(tmp_path / "out")]) == 2
    assert "pip install 'deit-distill[onnx]'" in one_error_line(capsys)
    assert cli(["predict", str(exported), "--onnx", "x.png"]) == 2
    assert "pip install 'deit-distill[onnx]'" in one_error_line(capsys)


# Push with the ONNX export, then run the card's two ONNX snippets as written (in the folder holding image.jpg).
PUSH_AND_RUN_CARD = """
import contextlib, io, json, re
from huggingface_hub import ModelCard
from deit_distill.model_cards.push import push_run

push_run(PARAMS["run"], PARAMS["repo"], with_onnx=True)
card = ModelCard.load(PARAMS["repo"])
runner_snippet, plain_snippet = re.findall(
    r"```python\\n(.*?)```", card.text.split("### ONNX Runtime")[1], flags=re.DOTALL
)
namespace = {}
exec(runner_snippet, namespace)
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    exec(plain_snippet, {})
print(json.dumps({"predictions": namespace["predictions"], "printed": printed.getvalue().strip()}))
"""


def test_push_with_onnx_uploads_the_export_and_the_cards_snippets_run(
    exported, make_run, hub_client, hub_server, tmp_path
):
    from hub_server import DEFAULT_TOKEN

    run, repo = make_run("deit-onnx"), "test-user/deit-onnx"
    rgb = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "image.jpg")
    result = hub_client(PUSH_AND_RUN_CARD, {"run": str(run), "repo": repo}, token=DEFAULT_TOKEN, cwd=tmp_path)

    files = hub_server.files(repo)
    for name in (
        "model.onnx",
        "model_int8.onnx",
        "config.json",
        "preprocessor_config.json",
        "onnx_export.json",
    ):
        assert f"onnx/{name}" in files
    assert "model.safetensors" in files  # the model itself, as without --with_onnx
    # The reference: the run's PyTorch model through the project's pipeline, on the same image.
    classifier = pipeline(
        "image-classification",
        model=str(run),
        trust_remote_code=True,
        pipeline_class=DeiTDistillImageClassificationPipeline,
    )
    expected = classifier(str(tmp_path / "image.jpg"), top_k=5)
    assert_same_predictions(result["predictions"], expected)
    assert result["printed"] == expected[0]["label"]


# ------------------------------------------------------------------------------------------------------------------
# The output folder: a non-empty one is refused and left byte for byte as it was; --overwrite true replaces a
# previous export whole; every file gets the mode `open()` gives.


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry of `folder` (recursively) with its bytes and mode, to prove a refusal changed nothing."""
    return {
        str(path.relative_to(folder)): (path.read_bytes() if path.is_file() else b"", path.stat().st_mode)
        for path in sorted(folder.rglob("*"))
    }


def open_mode(folder: Path) -> int:
    """The permission bits `open(path, "w")` gives a new file here: the reference for every saved file's mode."""
    probe = folder / ".probe"
    with open(probe, "w"):
        pass
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    return mode


def test_a_previous_export_is_refused_then_replaced_whole_with_overwrite(
    exported, tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "onnx"
    shutil.copytree(exported, out)  # a previous export with an int8 copy
    (out / "model_int8.onnx").chmod(0o600)  # as a library writing through a private temporary file leaves it
    before = folder_state(out)
    assert cli(["export", str(tiny_model_dir), "--output", str(out)]) == 2
    line = one_error_line(capsys)
    assert "--output" in line and "holds an ONNX export" in line and "--overwrite true" in line
    assert folder_state(out) == before

    assert cli(["export", str(tiny_model_dir), "--output", str(out), "--overwrite", "true"]) == 0
    fresh = tmp_path / "fresh"  # the reference: the same export into a new folder
    assert cli(["export", str(tiny_model_dir), "--output", str(fresh)]) == 0
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(path.name for path in fresh.iterdir()) and "model_int8.onnx" not in names
    assert json.loads((out / "onnx_export.json").read_text())["int8"] == {}
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging left
    mode = open_mode(tmp_path)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir()} == {
        name: oct(mode) for name in names
    }

    # A file the report does not list (left by an older version, or copied in) is refused by name.
    shutil.copy(exported / "model_int8.onnx", out)
    capsys.readouterr()
    assert cli(["predict", str(out), "--onnx", "--onnx_file", "model_int8.onnx", "x.png"]) == 2
    line = one_error_line(capsys)
    assert "--onnx_file model_int8.onnx" in line and "lists model.onnx only" in line


@pytest.mark.parametrize(
    ("entries", "overwrite"),
    [
        ({"notes.txt": b"mine"}, "true"),  # a file export never writes
        ({"model.onnx": b"x", "sub/keep.onnx": b"y"}, "true"),  # a subfolder
        ({"model.onnx": b"x", "deit_distill_run.json": b"{}"}, "true"),  # a training run's record
        ({"config.json": b"{}"}, "true"),  # no model.onnx or report: not an export
        ({"model.onnx": b"x"}, "false"),  # an export, but --overwrite not given
    ],
)
def test_export_never_replaces_what_is_not_its_own_output(
    entries, overwrite, tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    for name, content in entries.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    before = folder_state(out)
    assert cli(["export", str(tiny_model_dir), "--output", str(out), "--overwrite", overwrite]) == 2
    assert "--output" in one_error_line(capsys)
    assert folder_state(out) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_failed_export_leaves_the_previous_export_and_no_new_folder(
    stop, exported, tiny_model_dir, tmp_path, monkeypatch
):
    from deit_distill.training.commands import export as export_command

    def fail(model, processor, folder, **kwargs):
        (Path(folder) / "model.onnx").write_bytes(b"half written")
        raise stop("stopped")

    monkeypatch.setattr(export_command, "export_onnx", fail)
    out = tmp_path / "onnx"
    shutil.copytree(exported, out)
    before = folder_state(out)
    with pytest.raises(stop):
        export_command.main([str(tiny_model_dir), "--output", str(out), "--overwrite", "true"])
    assert folder_state(out) == before
    with pytest.raises(stop):  # into a new folder under new parents: none of them is left
        export_command.main([str(tiny_model_dir), "--output", str(tmp_path / "a" / "b" / "onnx")])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["onnx"]


def test_int8_flags_without_int8_are_refused(tiny_model_dir, tmp_path, capsys):
    for flags, named in (
        (["--int8_mode", "static"], "--int8_mode"),
        (["--batch_size", "8"], "--batch_size"),
        (["--quantize", "int8", "--calibration_samples", "8"], "--calibration_samples"),
        (["--quantize", "int8", "--batch_size", "8"], "--batch_size"),  # no run: no top-1 is measured
    ):
        assert cli(["export", str(tiny_model_dir), "--output", str(tmp_path / "out"), *flags]) == 2
        assert f"{named} is read only with --quantize int8" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
