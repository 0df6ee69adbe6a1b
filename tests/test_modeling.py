"""Specification of DeiTDistillConfig and DeiTDistillForImageClassification, each checked against an
independent reference (timm, plain torch ops, or the paper's numbers)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from timm.layers import resample_abs_pos_embed
from transformers import DeiTConfig

from deit_distill.modeling_deit_distill import DeiTDistillConfig, DeiTDistillForImageClassification, from_timm
from deit_distill.training.optim import no_decay_parameter_names

SMALL = {
    "image_size": 48,
    "patch_size": 8,
    "hidden_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "num_labels": 5,
}


def build(**overrides) -> DeiTDistillForImageClassification:
    torch.manual_seed(0)
    return DeiTDistillForImageClassification(DeiTDistillConfig(**{**SMALL, **overrides})).eval()


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_size": 100, "num_attention_heads": 3}, "divisible by num_attention_heads"),
        ({"image_size": 50, "patch_size": 8}, "divisible by patch_size"),
        ({"inference_head": "mean"}, "inference_head must be one of"),
        ({"use_distillation_token": False, "inference_head": "average"}, "needs the distillation token"),
    ],
)
def test_config_rejects_impossible_architectures_on_validate_save_and_build(fields, message, tmp_path):
    config = DeiTDistillConfig(**{**SMALL, **fields})  # partial or inconsistent arguments construct
    for use in (config.validate, lambda: config.save_pretrained(tmp_path), lambda: build(**fields)):
        with pytest.raises(StrictDataclassClassValidationError, match=message):
            use()


def test_config_changed_after_construction_is_caught_by_validate():
    config = DeiTDistillConfig(**SMALL)
    config.validate()
    config.num_attention_heads = 5
    with pytest.raises(StrictDataclassClassValidationError, match=r"hidden_size \(96\) must be divisible"):
        config.validate()


def test_config_with_partial_arguments_constructs_like_transformers_deit():
    assert DeiTConfig(hidden_size=32).hidden_size == DeiTDistillConfig(hidden_size=32).hidden_size == 32
    with pytest.raises(StrictDataclassFieldValidationError, match="expected int"):
        DeiTDistillConfig(hidden_size=32.5)  # field types are checked at once, as in transformers


@pytest.mark.parametrize(("variant", "paper_millions"), [("tiny", 5.9), ("small", 22), ("base", 87)])
def test_variant_parameter_count_equals_timm_and_paper(variant, paper_millions):
    with torch.device("meta"):
        ours = DeiTDistillForImageClassification(DeiTDistillConfig.from_variant(variant, num_labels=1000))
        reference = timm.create_model(f"deit_{variant}_distilled_patch16_224", pretrained=False)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e6, 1 if paper_millions < 10 else 0) == paper_millions


def test_sdpa_matches_eager_attention(pixels):
    model = build()
    with torch.no_grad():
        sdpa = model(pixels).logits
        model.set_attn_implementation("eager")
        eager = model(pixels).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_output_attentions_with_sdpa_config_returns_probabilities(pixels):
    model = build()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        outputs = model(pixels, output_attentions=True)
    sequence = 2 + (48 // 8) ** 2
    assert len(outputs.attentions) == SMALL["num_hidden_layers"]
    for attention in outputs.attentions:
        assert attention.shape == (2, SMALL["num_attention_heads"], sequence, sequence)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, sequence))


def test_hidden_states_hold_embeddings_and_every_block(pixels):
    with torch.no_grad():
        outputs = build()(pixels, output_hidden_states=True)
    assert len(outputs.hidden_states) == SMALL["num_hidden_layers"] + 1
    assert all(h.shape == (2, 38, SMALL["hidden_size"]) for h in outputs.hidden_states)


def test_drop_path_rate_rises_linearly_to_the_last_block():
    model = build(num_hidden_layers=5, drop_path_rate=0.2)
    rates = [layer.drop_path.drop_prob for layer in model.deit.layers]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 5))


def test_init_is_timm_truncated_normal_for_tokens_position_and_linears():
    model = build(hidden_size=192, num_attention_heads=3)
    embeddings = model.deit.embeddings
    for tensor in (embeddings.position_embeddings, model.deit.layers[0].attention.qkv_proj.weight):
        values = tensor.detach().flatten()
        assert abs(values.std().item() - 0.02) < 0.002 and abs(values.mean().item()) < 0.002
        # timm's trunc_normal_(std=.02) truncates at +-2 (absolute), so ~4.6% of values lie beyond 2 sigma.
        assert values.abs().max() <= 2.0
        assert 0.02 < (values.abs() > 0.04).float().mean() < 0.07
    assert embeddings.cls_token.std() > 0.01 and embeddings.distillation_token.std() > 0.01
    assert not torch.equal(embeddings.cls_token, embeddings.distillation_token)
    norm = model.deit.layers[0].layernorm_before
    assert torch.equal(norm.weight, torch.ones(192)) and torch.equal(norm.bias, torch.zeros(192))
    assert torch.equal(model.cls_classifier.bias, torch.zeros(SMALL["num_labels"]))


def _gradients(model: DeiTDistillForImageClassification, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(pixels, labels=torch.tensor([0, 4])).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients(pixels):
    model = build().train()
    plain = _gradients(model, pixels)
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.deit.layers)
    checkpointed = _gradients(model, pixels)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_no_weight_decay_lists_the_same_tokens_as_timm_and_optimizers_add_every_1d_parameter():
    reference = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        img_size=48,
        patch_size=8,
        embed_dim=96,
        depth=2,
        num_heads=3,
        num_classes=5,
    )
    model = from_timm(reference)
    timm_to_ours = {
        "cls_token": "deit.embeddings.cls_token",
        "dist_token": "deit.embeddings.distillation_token",
        "pos_embed": "deit.embeddings.position_embeddings",
    }
    assert model.no_weight_decay() == {
        timm_to_ours[name] for name, _ in reference.named_parameters() if name in reference.no_weight_decay()
    }
    assert model.deit.no_weight_decay() == {name.removeprefix("deit.") for name in model.no_weight_decay()}
    expected = model.no_weight_decay() | {
        n for n, _ in model.named_parameters() if n.endswith(".bias") or "layernorm" in n
    }
    assert no_decay_parameter_names(model) == expected
    assert "deit.layers.0.attention.qkv_proj.weight" not in expected


def test_supervised_loss_reaches_every_parameter_through_both_heads(pixels):
    gradients = _gradients(build().train(), pixels)
    assert all(grad.abs().sum() > 0 for grad in gradients.values()), [
        n for n, g in gradients.items() if not g.any()
    ]


def test_interpolated_position_encoding_equals_timm_resample_and_set_input_size():
    model = build()
    pixels = torch.randn(1, 3, 64, 64)
    table = model.deit.embeddings.position_embeddings.detach()
    # antialias=False as in the official DeiT fine-tuning code and transformers; timm's default (True) switches
    # PyTorch to a different bicubic kernel (a=-0.5 instead of -0.75), even when upsampling.
    expected_table = resample_abs_pos_embed(
        table, new_size=(8, 8), old_size=(6, 6), num_prefix_tokens=2, antialias=False
    )
    with torch.no_grad():
        interpolated = model(pixels, interpolate_pos_encoding=True).logits
        model.set_input_size(64)
        resized = model(pixels).logits
    new_table = model.deit.embeddings.position_embeddings
    torch.testing.assert_close(new_table, expected_table, atol=1e-6, rtol=1e-6)
    assert torch.equal(new_table[:, :2], table[:, :2])
    assert model.config.image_size == 64
    torch.testing.assert_close(resized, interpolated, atol=1e-5, rtol=1e-5)


def test_wrong_image_size_error_names_sizes_and_fixes(pixels):
    with pytest.raises(
        ValueError, match=r"\(32x32\) doesn't match the model \(48x48\).*interpolate_pos_encoding"
    ):
        build()(F.interpolate(pixels, size=32))


def test_wrong_channel_count_error():
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\), got \(2, 1, 48, 48\)"):
        build()(torch.randn(2, 1, 48, 48))


def test_labels_out_of_range_error(pixels):
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\), got values in \[0, 5\]"):
        build()(pixels, labels=torch.tensor([0, 5]))
