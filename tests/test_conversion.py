"""Conversion from and to transformers and timm is exact: same logits (fp32, eval) and identical round trips.

References are randomly initialised, then every parameter is perturbed (transformers zero-inits the tokens and
the position embedding, LayerNorms start at 1/0), so a swapped or dropped tensor cannot go unnoticed.
"""

from __future__ import annotations

import argparse
import os
import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    ViTConfig,
    ViTForImageClassification,
)

from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    from_timm,
    from_transformers_deit,
    from_transformers_state_dict,
    to_transformers_deit,
    to_transformers_vit,
)
from deit_distill.training.commands.convert import build_parser, run_convert

# Odd on purpose: patch 8, 3 heads of 32, MLP ratio 2, 5 labels; plus no qkv bias and a non-square image.
SHAPES = {
    "square": {"image_size": 48, "qkv_bias": True},
    "no_qkv_bias": {"image_size": 48, "qkv_bias": False},
    "non_square": {"image_size": (48, 32), "qkv_bias": True},
}
WIDTH, DEPTH, HEADS, PATCH, LABELS, MLP = 96, 2, 3, 8, 5, 192
ARCH = {
    "image_size": 48,
    "patch_size": PATCH,
    "hidden_size": WIDTH,
    "num_hidden_layers": DEPTH,
    "num_attention_heads": HEADS,
    "intermediate_size": MLP,
}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def pixels_for(image_size: int | tuple[int, int]) -> torch.Tensor:
    height, width = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))


def transformers_reference(cls: type, image_size, qkv_bias: bool):
    config_class = ViTConfig if cls is ViTForImageClassification else DeiTConfig
    # layer_norm_eps stays at transformers' default (1e-12) so the conversion must carry it.
    config = config_class(
        image_size=list(image_size) if isinstance(image_size, tuple) else image_size,
        patch_size=PATCH,
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        qkv_bias=qkv_bias,
        num_labels=LABELS,
        id2label={i: f"class_{i}" for i in range(LABELS)},
    )
    torch.manual_seed(0)
    return perturbed(cls(config))


def timm_reference(cls: type, image_size, qkv_bias: bool):
    torch.manual_seed(0)
    model = cls(
        img_size=image_size,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP / WIDTH,
        qkv_bias=qkv_bias,
        num_classes=LABELS,
    )
    return perturbed(model)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def assert_identical_state_dicts(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for key in left:
        assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("shape", SHAPES)
def test_transformers_deit_with_teacher_converts_exactly(shape):
    reference = transformers_reference(DeiTForImageClassificationWithTeacher, **SHAPES[shape])
    ours = from_transformers_deit(reference)
    pixels = pixels_for(SHAPES[shape]["image_size"])
    with torch.no_grad():
        expected, actual = reference(pixels), ours(pixels)
    for field in ("logits", "cls_logits", "distillation_logits"):
        assert_logits_close(actual[field], expected[field])
    assert ours.config.inference_head == "average"
    assert ours.config.layer_norm_eps == 1e-12
    assert ours.config.id2label[4] == "class_4"


@pytest.mark.parametrize("shape", SHAPES)
def test_transformers_deit_without_teacher_keeps_dist_token_and_reads_the_cls_head(shape):
    reference = transformers_reference(DeiTForImageClassification, **SHAPES[shape])
    ours = from_transformers_deit(reference)
    pixels = pixels_for(SHAPES[shape]["image_size"])
    with torch.no_grad():
        expected, actual = reference(pixels).logits, ours(pixels)
    assert ours.config.use_distillation_token and ours.config.inference_head == "cls"
    assert_logits_close(actual.logits, expected)
    assert_logits_close(actual.cls_logits, expected)
    # The DIST head has no source weights; it starts as a copy of the CLS head.
    assert torch.equal(ours.distillation_classifier.weight, ours.cls_classifier.weight)


@pytest.mark.parametrize("shape", SHAPES)
def test_transformers_vit_converts_to_a_model_without_dist_token(shape):
    reference = transformers_reference(ViTForImageClassification, **SHAPES[shape])
    ours = from_transformers_deit(reference)
    pixels = pixels_for(SHAPES[shape]["image_size"])
    with torch.no_grad():
        assert_logits_close(ours(pixels).logits, reference(pixels).logits)
    assert not ours.config.use_distillation_token and ours.config.layer_norm_eps == 1e-12


def _as_transformers_4x(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names of transformers 4.x checkpoints, written out independently of the converter's table."""
    renames = [
        (r"\.layers\.(\d+)\.attention\.q_proj\.", r".encoder.layer.\1.attention.attention.query."),
        (r"\.layers\.(\d+)\.attention\.k_proj\.", r".encoder.layer.\1.attention.attention.key."),
        (r"\.layers\.(\d+)\.attention\.v_proj\.", r".encoder.layer.\1.attention.attention.value."),
        (r"\.layers\.(\d+)\.attention\.o_proj\.", r".encoder.layer.\1.attention.output.dense."),
        (r"\.layers\.(\d+)\.mlp\.fc1\.", r".encoder.layer.\1.intermediate.dense."),
        (r"\.layers\.(\d+)\.mlp\.fc2\.", r".encoder.layer.\1.output.dense."),
        (r"\.layers\.(\d+)\.layernorm_", r".encoder.layer.\1.layernorm_"),
    ]
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    return renamed


def test_transformers_4x_key_names_convert_and_the_pooler_is_dropped():
    reference = transformers_reference(DeiTForImageClassificationWithTeacher, 48, True)
    legacy = _as_transformers_4x(reference.state_dict())
    assert "deit.encoder.layer.1.attention.attention.value.weight" in legacy
    legacy["deit.pooler.dense.weight"] = torch.zeros(WIDTH, WIDTH)
    legacy["deit.pooler.dense.bias"] = torch.zeros(WIDTH)
    ours = from_transformers_state_dict(legacy, reference.config)
    assert_identical_state_dicts(ours, from_transformers_deit(reference))


@pytest.mark.parametrize("shape", SHAPES)
def test_timm_distilled_converts_exactly_in_eval_and_distilled_training(shape):
    reference = timm_reference(VisionTransformerDistilled, **SHAPES[shape])
    ours = from_timm(reference)
    pixels = pixels_for(SHAPES[shape]["image_size"])
    with torch.no_grad():
        assert_logits_close(ours(pixels).logits, reference(pixels))
        reference.set_distilled_training(True)
        cls_logits, distillation_logits = reference.train()(pixels)
        outputs = ours.train()(pixels)
    assert_logits_close(outputs.cls_logits, cls_logits)
    assert_logits_close(outputs.distillation_logits, distillation_logits)
    assert ours.config.layer_norm_eps == 1e-6 and ours.config.intermediate_size == MLP


@pytest.mark.parametrize("shape", SHAPES)
def test_timm_vit_converts_exactly(shape):
    reference = timm_reference(VisionTransformer, **SHAPES[shape])
    ours = from_timm(reference)
    pixels = pixels_for(SHAPES[shape]["image_size"])
    with torch.no_grad():
        assert_logits_close(ours(pixels).logits, reference(pixels))
    assert not ours.config.use_distillation_token


def test_timm_state_dict_with_head_count_equals_model_conversion():
    reference = timm_reference(VisionTransformerDistilled, 48, True)
    from_model = from_timm(reference)
    from_state_dict = from_timm(reference.state_dict(), num_attention_heads=HEADS)
    assert_identical_state_dicts(from_state_dict, from_model)
    assert from_state_dict.config.to_dict() == from_model.config.to_dict()


def test_official_timm_deit_tiny_layout_converts_exactly():
    torch.manual_seed(0)
    reference = perturbed(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False))
    ours = from_timm(reference)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_logits_close(ours(pixels).logits, reference(pixels))
    assert (ours.config.hidden_size, ours.config.num_attention_heads, ours.config.num_labels) == (
        192,
        3,
        1000,
    )


@pytest.mark.parametrize("use_distillation_token", [True, False])
def test_round_trip_through_transformers_is_identical(use_distillation_token):
    torch.manual_seed(0)
    config = DeiTDistillConfig(
        image_size=(48, 32),
        patch_size=PATCH,
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        num_labels=LABELS,
        layer_norm_eps=1e-5,
        use_distillation_token=use_distillation_token,
        inference_head="average" if use_distillation_token else "cls",
        id2label={i: f"class_{i}" for i in range(LABELS)},
    )
    ours = perturbed(DeiTDistillForImageClassification(config))
    exported = to_transformers_deit(ours) if use_distillation_token else to_transformers_vit(ours)
    pixels = pixels_for((48, 32))
    with torch.no_grad():
        assert_logits_close(exported(pixels).logits, ours(pixels).logits)
    assert exported.config.layer_norm_eps == 1e-5 and exported.config.id2label[0] == "class_0"
    back = from_transformers_deit(exported)
    assert_identical_state_dicts(back, ours)
    for field in (
        "image_size",
        "hidden_size",
        "intermediate_size",
        "layer_norm_eps",
        "id2label",
        "hidden_act",
    ):
        assert getattr(back.config, field) == getattr(ours.config, field), field


def test_round_trip_keeps_bfloat16_bits():
    ours = perturbed(
        DeiTDistillForImageClassification(DeiTDistillConfig.from_variant("tiny", num_hidden_layers=1))
    )
    ours = ours.to(torch.bfloat16)
    back = from_transformers_deit(to_transformers_deit(ours))
    assert_identical_state_dicts(back, ours)


def test_unknown_timm_keys_are_listed():
    reference = VisionTransformer(
        img_size=48,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=5,
        init_values=1e-5,
    )
    with pytest.raises(
        ValueError, match=r"no counterpart in DeiTDistill: blocks\.0\.ls1\.gamma, blocks\.0\.ls2"
    ):
        from_timm(reference.state_dict(), num_attention_heads=HEADS)


def test_shape_mismatch_names_the_key_and_both_shapes():
    reference = timm_reference(VisionTransformerDistilled, 48, True)
    config = DeiTDistillConfig(**{**ARCH, "image_size": 64}, num_labels=LABELS)
    with pytest.raises(
        ValueError, match=r"position_embeddings \(from timm pos_embed\).*\(1, 38, 96\).*\(1, 66, 96\)"
    ):
        from_timm(reference, config=config)


def test_model_without_dist_token_into_a_config_with_one_is_rejected():
    reference = timm_reference(VisionTransformer, 48, True)
    config = DeiTDistillConfig(**ARCH, num_labels=LABELS, use_distillation_token=True)
    with pytest.raises(
        ValueError, match="has no distillation token but the config sets use_distillation_token=True"
    ):
        from_timm(reference, config=config)


def test_state_dict_without_head_count_asks_for_it():
    with pytest.raises(ValueError, match="num_attention_heads cannot be inferred"):
        from_timm(timm_reference(VisionTransformerDistilled, 48, True).state_dict())


def test_unsupported_timm_pooling_and_headless_models_are_rejected():
    pooled = VisionTransformer(
        img_size=48,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=1,
        num_heads=HEADS,
        global_pool="avg",
        fc_norm=False,
    )
    with pytest.raises(ValueError, match="global_pool='avg'"):
        from_timm(pooled)
    headless = VisionTransformer(
        img_size=48, patch_size=PATCH, embed_dim=WIDTH, depth=1, num_heads=HEADS, num_classes=0
    )
    with pytest.raises(ValueError, match="no classifier"):
        from_timm(headless)


def test_export_targets_match_the_distillation_token():
    with_token = DeiTDistillForImageClassification(DeiTDistillConfig(**ARCH))
    without = DeiTDistillForImageClassification(
        DeiTDistillConfig(**ARCH, use_distillation_token=False, inference_head="cls")
    )
    with pytest.raises(ValueError, match="to_transformers_vit"):
        to_transformers_deit(without)
    with pytest.raises(ValueError, match="to_transformers_deit"):
        to_transformers_vit(with_token)


def test_transformers_base_model_is_rejected():
    base = DeiTModel(DeiTConfig(**ARCH))
    with pytest.raises(ValueError, match="no head to convert"):
        from_transformers_deit(base)


def _cli(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_cli_converts_a_timm_checkpoint_file_and_a_named_timm_model(tmp_path):
    small = timm_reference(VisionTransformerDistilled, 48, True)
    save_file(small.state_dict(), tmp_path / "small.safetensors")
    out = run_convert(
        _cli("--from", "timm", "--source", str(tmp_path / "small.safetensors"), "--num-attention-heads", "3",
             "--output", str(tmp_path / "ours"))
    )  # fmt: skip
    pixels = pixels_for(48)
    with torch.no_grad():
        assert_logits_close(
            DeiTDistillForImageClassification.from_pretrained(out)(pixels).logits, small(pixels)
        )
    assert (out / "preprocessor_config.json").is_file()

    # timm's registered `test_vit` (6 blocks of width 64, no DIST token) keeps the named-model path cheap.
    torch.manual_seed(0)
    named = perturbed(timm.create_model("test_vit", pretrained=False, num_classes=LABELS))
    torch.save({"model": named.state_dict()}, tmp_path / "test_vit.pth")
    (tmp_path / "labels.json").write_text('{"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"}')
    out = run_convert(
        _cli("--from", "timm", "--source", "test_vit", "--checkpoint", str(tmp_path / "test_vit.pth"), "--to",
             "transformers", "--id2label", str(tmp_path / "labels.json"), "--output", str(tmp_path / "native"))
    )  # fmt: skip
    native = ViTForImageClassification.from_pretrained(out)
    pixels = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert_logits_close(native(pixels).logits, named(pixels))
    assert native.config.id2label[4] == "e" and native.config.layer_norm_eps == 1e-6


def test_cli_converts_transformers_dirs_and_exports_our_dirs_natively(tmp_path):
    reference = transformers_reference(DeiTForImageClassificationWithTeacher, (48, 32), True)
    reference.save_pretrained(tmp_path / "native")
    ours_dir = run_convert(
        _cli(
            "--from", "transformers", "--source", str(tmp_path / "native"), "--output", str(tmp_path / "ours")
        )
    )
    back_dir = run_convert(
        _cli(
            "--from",
            "deit-distill",
            "--source",
            str(ours_dir),
            "--to",
            "transformers",
            "--output",
            str(tmp_path / "back"),
        )
    )
    pixels = pixels_for((48, 32))
    with torch.no_grad():
        expected = reference(pixels).logits
        assert_logits_close(
            DeiTDistillForImageClassification.from_pretrained(ours_dir)(pixels).logits, expected
        )
        assert_logits_close(
            DeiTForImageClassificationWithTeacher.from_pretrained(back_dir)(pixels).logits, expected
        )


# ------------------------------------------------------------------------------------------------------------------
# convert's output folder and its messages, through the command line as a user runs it.


def _folder_state(folder) -> dict[str, tuple[bytes, int]]:
    return {
        str(path.relative_to(folder)): (path.read_bytes() if path.is_file() else b"", path.stat().st_mode)
        for path in sorted(folder.rglob("*"))
    }


def _open_mode(folder) -> int:
    """The permission bits `open(path, "w")` gives a new file now: the reference for every saved file's mode."""
    probe = folder / ".probe"
    probe.write_text("")
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    return mode


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deit-distill: error: "), err
    return err[0]


def test_convert_refuses_a_previous_output_then_replaces_it_whole_with_the_umask_mode(tmp_path, capsys):
    from deit_distill.training.commands.cli import main as cli

    reference = transformers_reference(DeiTForImageClassificationWithTeacher, 48, True)
    reference.save_pretrained(tmp_path / "native")
    out, convert = (
        tmp_path / "out",
        ["convert", "--from", "transformers", "--source", str(tmp_path / "native")],
    )
    assert cli([*convert, "--output", str(out)]) == 0  # ours: with the model's code files
    assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()} == {
        path.name: _open_mode(tmp_path) for path in out.iterdir()
    }  # model.safetensors included (safetensors alone leaves it 0600)
    before = _folder_state(out)
    capsys.readouterr()
    assert cli([*convert, "--to", "transformers", "--output", str(out)]) == 2
    line = _error_line(capsys)
    assert "--output" in line and "holds a converted model" in line and "--overwrite true" in line
    assert _folder_state(out) == before

    umask = os.umask(0o027)  # another umask: the modes follow it, they are not a fixed 0644
    try:
        assert cli([*convert, "--to", "transformers", "--output", str(out), "--overwrite", "true"]) == 0
        assert cli([*convert, "--to", "transformers", "--output", str(tmp_path / "fresh")]) == 0
        mode = _open_mode(tmp_path)
    finally:
        os.umask(umask)
    assert mode == 0o640
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(path.name for path in (tmp_path / "fresh").iterdir())
    assert not [name for name in names if name.endswith(".py")]  # ours' code files did not survive
    assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()} == dict.fromkeys(names, mode)
    pixels = pixels_for(48)
    with torch.no_grad():
        assert_logits_close(
            DeiTForImageClassificationWithTeacher.from_pretrained(out)(pixels).logits,
            reference(pixels).logits,
        )

    # A training run (its record, its card) is never replaced, --overwrite or not.
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "deit_distill_run.json", "README.md"):
        (run / name).write_text("{}")
    before = _folder_state(run)
    capsys.readouterr()
    assert cli([*convert, "--output", str(run), "--overwrite", "true"]) == 2
    assert "holds files that are not a converted model (README.md, deit_distill_run.json)" in _error_line(
        capsys
    )
    assert _folder_state(run) == before


def test_convert_names_what_each_source_and_checkpoint_actually_is(tmp_path, capsys):
    from deit_distill.training.commands.cli import main as cli

    weights = tmp_path / "weights" / "deit.safetensors"
    weights.parent.mkdir()
    save_file(timm_reference(VisionTransformerDistilled, 48, True).state_dict(), weights)
    timm_convert = ["convert", "--from", "timm", "--output", str(tmp_path / "out"), "--source"]
    cases = [
        (["nosuch.pth"], "--source nosuch.pth: no such file; --from timm takes a weights file"),
        ([str(weights.parent)], f"is a folder (it holds {weights.name}: give that file)"),
        (["deit_tiny_distiled_patch16_224"], "did you mean deit_tiny_distilled_patch16_224?"),
        (["test_vit"], "--source test_vit is a timm model name, and weights are never downloaded: pass its weights as --checkpoint FILE"),
        (["test_vit", "--checkpoint", "missing.pth"], "--checkpoint missing.pth: no such file"),
        (["test_vit", "--checkpoint", str(weights)], f"--checkpoint {weights} does not fit timm's test_vit"),
        ([str(weights), "--checkpoint", str(weights)], "is already the weights file: leave --checkpoint out"),
        (["test_vit", "--image_size", "48", "48", "--checkpoint", str(weights)], "--image_size describe a weights file"),
        ([str(weights), "--crop_pct", "0"], "--crop_pct must be in (0, 1], got 0.0"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert cli([*timm_convert, *argv]) == 2, argv
        assert expected in _error_line(capsys), argv
    native = [
        "convert",
        "--from",
        "transformers",
        "--source",
        str(tmp_path),
        "--output",
        str(tmp_path / "out"),
    ]
    assert cli([*native, "--checkpoint", str(weights)]) == 2
    assert "--checkpoint is read only with --from timm" in _error_line(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["weights"]  # nothing written


def test_convert_refuses_a_source_of_the_other_kind_instead_of_reinitialising_it(tmp_path, capsys):
    """from_pretrained only warns when a checkpoint does not fit the class: a ResNet or a transformers DeiT read
    as a deit-distill model came out as a random DeiT, saved with exit 0."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from deit_distill.training.commands.cli import main as cli

    ResNetForImageClassification(
        ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)
    ).save_pretrained(tmp_path / "resnet")
    transformers_reference(DeiTForImageClassificationWithTeacher, (48, 32), True).save_pretrained(
        tmp_path / "native"
    )
    ours = run_convert(
        _cli(
            "--from", "transformers", "--source", str(tmp_path / "native"), "--output", str(tmp_path / "ours")
        )
    )
    capsys.readouterr()
    cases = [
        ("deit-distill", tmp_path / "resnet", "is a resnet model (ResNetForImageClassification), not a deit-distill one: only DeiT and ViT"),
        ("deit-distill", tmp_path / "native", "is a deit model (DeiTForImageClassificationWithTeacher), not a deit-distill one: --from transformers reads it"),
        ("transformers", ours, "is a deit-distill model already: convert it with --from deit-distill"),
    ]  # fmt: skip
    for source_format, source, expected in cases:
        assert (
            cli(
                ["convert", "--from", source_format, "--source", str(source), "--output", str(tmp_path / "x")]
            )
            == 2
        )
        assert expected in _error_line(capsys), source
    assert not (tmp_path / "x").exists()
