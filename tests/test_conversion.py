"""Conversion from and to transformers and timm is exact: same logits (fp32, eval) and identical round trips.

References are randomly initialised, then every parameter is perturbed (transformers zero-inits the tokens and
the position embedding, LayerNorms start at 1/0), so a swapped or dropped tensor cannot go unnoticed.
"""

from __future__ import annotations

import argparse
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
