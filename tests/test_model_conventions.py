"""The conventions a transformers or timm user relies on, each checked against transformers' or timm's own code:
`problem_type` losses, layer-indexed hidden states, timm's head/feature API and layer-wise lr decay."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay
from transformers import TrainingArguments

from deit_distill.modeling_deit_distill import (
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    from_timm,
    to_transformers_deit,
    to_transformers_vit,
)
from deit_distill.modeling_deit_distill.convert_deit_distill import _TIMM_RULES, _import_weights
from deit_distill.training.optim import no_decay_parameter_names
from deit_distill.training.trainer import DistillationTrainer

TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 3,
}
BATCH = 4


def build(**overrides) -> DeiTDistillForImageClassification:
    torch.manual_seed(0)
    config = DeiTDistillConfig(**{**TINY, "num_labels": 3, "attn_implementation": "eager", **overrides})
    return DeiTDistillForImageClassification(config).eval()


def timm_deit(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=3,
        num_heads=3,
        num_classes=num_classes,
    ).eval()


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------------------
# problem_type


def _labels(kind: str, num_labels: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    if kind == "index":
        return torch.randint(0, num_labels, (BATCH,), generator=generator)
    if kind == "multi_hot":
        return torch.randint(0, 2, (BATCH, num_labels), generator=generator).float()
    return torch.randn(BATCH, num_labels, generator=generator).squeeze(-1)


@pytest.mark.parametrize(
    ("problem_type", "num_labels", "kind"),
    [
        ("regression", 1, "float"),
        ("regression", 3, "float"),
        ("multi_label_classification", 3, "multi_hot"),
        ("single_label_classification", 3, "index"),
        (None, 3, "index"),  # resolved as single-label, as transformers does
        (None, 1, "float"),  # resolved as regression
    ],
)
def test_problem_type_loss_equals_transformers_vit_on_the_same_logits(problem_type, num_labels, kind, pixels):
    model = build(use_distillation_token=False, inference_head="cls", num_labels=num_labels)
    model.config.problem_type = problem_type
    vit = to_transformers_vit(model)
    vit.config.problem_type = problem_type
    labels = _labels(kind, num_labels)
    with torch.no_grad():
        ours, reference = model(pixels, labels=labels), vit(pixels, labels=labels)
    torch.testing.assert_close(ours.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, reference.loss, atol=1e-5, rtol=1e-5)
    assert model.config.problem_type == vit.config.problem_type


def test_both_heads_share_the_loss_under_any_problem_type(pixels):
    model = build(problem_type="multi_label_classification")
    labels = _labels("multi_hot", 3)
    with torch.no_grad():
        out = model(pixels, labels=labels)
    expected = (
        F.binary_cross_entropy_with_logits(out.cls_logits, labels)
        + F.binary_cross_entropy_with_logits(out.distillation_logits, labels)
    ) / 2
    torch.testing.assert_close(out.loss, expected)


def test_soft_targets_without_problem_type_are_mixup_cross_entropy_not_bce(pixels):
    model = build()
    soft = torch.softmax(torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(3)), -1)
    with torch.no_grad():
        out = model(pixels, labels=soft)
    expected = (F.cross_entropy(out.cls_logits, soft) + F.cross_entropy(out.distillation_logits, soft)) / 2
    torch.testing.assert_close(out.loss, expected)
    assert model.config.problem_type is None  # a Mixup batch does not decide the problem type


# ------------------------------------------------------------------------------------------------------------------
# Output capturing


@pytest.mark.parametrize("selection", [True, [0, 2], [-1], 1])
def test_hidden_states_by_layer_index_equal_transformers_deit(selection, pixels):
    model = build()
    reference = to_transformers_deit(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        ours = model(pixels, output_hidden_states=selection, output_attentions=True)
        theirs = reference(pixels, output_hidden_states=selection, output_attentions=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for mine, expected in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert (mine is None) == (expected is None)
        if expected is not None:
            torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)
    for mine, expected in zip(ours.attentions, theirs.attentions, strict=True):
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)


def test_return_dict_false_gives_the_tuple_transformers_gives(pixels):
    model = build()
    reference = to_transformers_deit(model)
    with torch.no_grad():
        ours = model(pixels, output_hidden_states=True, return_dict=False)
        theirs = reference(pixels, output_hidden_states=True, return_dict=False)
    # (logits, cls_logits, distillation_logits, hidden_states) in both.
    assert len(ours) == len(theirs) == 4
    for mine, expected in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)
    assert len(ours[3]) == len(theirs[3]) == TINY["num_hidden_layers"] + 1


# ------------------------------------------------------------------------------------------------------------------
# timm's model API


def test_forward_features_and_head_equal_timm(pixels):
    reference = timm_deit()
    model = from_timm(reference)
    with torch.no_grad():
        features = model.forward_features(pixels)
        torch.testing.assert_close(features, reference.forward_features(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.forward_head(features), reference.forward_head(features), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            model.forward_head(features, pre_logits=True),
            reference.forward_head(features, pre_logits=True),
            atol=1e-5,
            rtol=1e-5,
        )


def test_reset_classifier_gives_fresh_heads_and_keeps_the_backbone(pixels):
    model = build()
    with torch.no_grad():
        before = model.forward_features(pixels)
    model.reset_classifier(7)
    assert model.num_labels == model.config.num_labels == len(model.config.id2label) == 7
    for head in model.get_classifier():
        assert head.weight.shape == (7, TINY["hidden_size"])
        assert torch.equal(head.bias, torch.zeros(7)) and 0.01 < head.weight.std() < 0.03
    with torch.no_grad():
        out = model(pixels, labels=torch.tensor([0, 6, 3, 1]))
        torch.testing.assert_close(model.forward_features(pixels), before)
    assert out.logits.shape == (BATCH, 7) and out.loss.isfinite()


@pytest.mark.parametrize("how", ["config", "reset_classifier"])
def test_num_labels_zero_is_a_headless_feature_extractor(how, pixels):
    model = build(num_labels=0) if how == "config" else build()
    if how == "reset_classifier":
        model.reset_classifier(0)
    assert not any(
        name.startswith(("cls_classifier", "distillation_classifier")) for name, _ in model.named_parameters()
    )
    with torch.no_grad():
        features = model.forward_features(pixels)
        logits = model(pixels).logits
    torch.testing.assert_close(logits, (features[:, 0] + features[:, 1]) / 2)
    torch.testing.assert_close(logits, model.forward_head(features, pre_logits=True))
    with pytest.raises(ValueError, match=r"headless \(num_labels=0"):
        model(pixels, labels=torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize(
    ("kwargs", "blocks"),
    [
        ({}, [0, 1, 2]),
        ({"indices": 2}, [1, 2]),
        ({"indices": [0, -1], "norm": True}, [0, 2]),
        ({"indices": [1], "output_fmt": "NLC", "return_prefix_tokens": True}, [1]),
    ],
)
def test_forward_intermediates_shapes_and_values_equal_timm(kwargs, blocks, pixels):
    reference = timm_deit()
    model = from_timm(reference)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(pixels, **kwargs)
        expected_final, expected = reference.forward_intermediates(pixels, **kwargs)
        only = model.forward_intermediates(pixels, intermediates_only=True, **kwargs)
    torch.testing.assert_close(final, expected_final, atol=1e-5, rtol=1e-5)
    assert len(intermediates) == len(expected) == len(only) == len(blocks)
    shape = (BATCH, 16, 48) if kwargs.get("output_fmt") == "NLC" else (BATCH, 48, 4, 4)
    for mine, theirs, alone in zip(intermediates, expected, only, strict=True):
        if kwargs.get("return_prefix_tokens"):
            assert mine[1].shape == theirs[1].shape == (BATCH, 2, 48)
            torch.testing.assert_close(mine[1], theirs[1], atol=1e-5, rtol=1e-5)
            mine, theirs, alone = mine[0], theirs[0], alone[0]
        assert mine.shape == shape
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone, mine)


# ------------------------------------------------------------------------------------------------------------------
# Weight decay and layer-wise lr decay


def _per_parameter(groups: list[dict], names: dict[int, str]) -> dict[str, tuple[float, float]]:
    return {
        names[id(p)]: (group["lr_scale"], group["weight_decay"]) for group in groups for p in group["params"]
    }


def test_group_matcher_and_layer_decay_give_timms_per_block_rates_on_timms_deit():
    reference = timm_deit()
    model = from_timm(reference)
    _, origins = _import_weights(reference.state_dict(), _TIMM_RULES, "timm", {})
    timm_groups = param_groups_layer_decay(
        reference, weight_decay=0.05, no_weight_decay_list=reference.no_weight_decay(), layer_decay=0.65
    )
    our_groups = param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=no_decay_parameter_names(model), layer_decay=0.65
    )
    theirs = _per_parameter(timm_groups, {id(p): n for n, p in reference.named_parameters()})
    ours = _per_parameter(our_groups, {id(p): n for n, p in model.named_parameters()})
    assert {origins[name]: value for name, value in ours.items()} == theirs
    # Embeddings at 0.65**4, block i at 0.65**(3 - i), heads at the full rate.
    assert ours["deit.embeddings.cls_token"] == (pytest.approx(0.65**4), 0.0)
    assert ours["deit.layers.0.mlp.fc1.weight"] == (pytest.approx(0.65**3), 0.05)
    assert ours["cls_classifier.weight"] == (1.0, 0.05)


def test_trainer_layer_decay_sets_each_groups_lr_and_keeps_the_decay_split(tmp_path):
    model = from_timm(timm_deit())
    args = TrainingArguments(tmp_path, learning_rate=1e-3, weight_decay=0.05, report_to=[], use_cpu=True)
    optimizer = DistillationTrainer(model=model, args=args, layer_decay=0.65).create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = no_decay_parameter_names(model)
    seen = set()
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            assert group["weight_decay"] == (0.0 if name in no_decay else 0.05), name
    assert seen == set(names.values())
    assert {round(g["lr"] / 1e-3, 6) for g in optimizer.param_groups} == {round(0.65**k, 6) for k in range(5)}
