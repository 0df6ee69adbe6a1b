"""DistillationLoss against the paper's formulas written out by hand in float64."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from deit_distill.training.losses import DistillationLoss

B, C = 6, 10
# The class computes in float32; the references are float64.
assert_close = partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6, check_dtype=False)


def log_softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))


def cross_entropy_by_hand(z: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the batch of -sum_c q_c log p_c, with q one-hot (smoothed) or the given soft targets."""
    logp = log_softmax_by_hand(z)
    if y.is_floating_point():
        q = y.double()
    else:
        q = torch.zeros_like(logp)
        q[torch.arange(len(y)), y] = 1.0
        q = q * (1 - smoothing) + smoothing / z.shape[-1]
    return -(q * logp).sum(dim=-1).mean()


def soft_kl_by_hand(z_student: torch.Tensor, z_teacher: torch.Tensor, tau: float, per: str) -> torch.Tensor:
    """tau^2 * sum over batch and classes of p_t (log p_t - log p_s), divided by B*C ("numel") or B."""
    logp_s = log_softmax_by_hand(z_student / tau)
    logp_t = log_softmax_by_hand(z_teacher / tau)
    total = (torch.exp(logp_t) * (logp_t - logp_s)).sum()
    denominator = z_student.numel() if per == "numel" else z_student.shape[0]
    return tau**2 * total / denominator


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        cls=torch.randn(B, C, generator=g) * 2,
        dist=torch.randn(B, C, generator=g) * 2,
        teacher=torch.randn(B, C, generator=g) * 3,
        labels=torch.randint(0, C, (B,), generator=g),
    )


def two_heads(t):
    return SimpleNamespace(cls_logits=t.cls, distillation_logits=t.dist)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("kl_reduction", ["numel", "batchmean"])
def test_soft_matches_paper_formula(logits, alpha, tau, kl_reduction):
    loss_fn = DistillationLoss("soft", alpha=alpha, tau=tau, kl_reduction=kl_reduction)
    out = loss_fn(two_heads(logits), logits.labels, logits.teacher)
    base = cross_entropy_by_hand(logits.cls, logits.labels)
    kl = soft_kl_by_hand(logits.dist, logits.teacher, tau, kl_reduction)
    assert_close(out.base_loss, base)
    assert_close(out.distillation_loss, kl)
    assert_close(out.loss, (1 - alpha) * base + alpha * kl)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_hard_matches_paper_formula(logits, alpha):
    loss_fn = DistillationLoss("hard", alpha=alpha, label_smoothing=0.1)
    out = loss_fn(two_heads(logits), logits.labels, logits.teacher)
    base = cross_entropy_by_hand(logits.cls, logits.labels, smoothing=0.1)
    # No smoothing on the teacher's labels.
    dist = cross_entropy_by_hand(logits.dist, logits.teacher.argmax(dim=-1))
    assert_close(out.loss, (1 - alpha) * base + alpha * dist)
    assert_close(out.distillation_loss, dist)


def test_batchmean_is_exactly_num_classes_times_numel(logits):
    numel = DistillationLoss("soft", kl_reduction="numel")(two_heads(logits), logits.labels, logits.teacher)
    batchmean = DistillationLoss("soft", kl_reduction="batchmean")(
        two_heads(logits), logits.labels, logits.teacher
    )
    assert_close(batchmean.distillation_loss, C * numel.distillation_loss)


def test_label_smoothing_applies_to_hard_labels(logits):
    out = DistillationLoss("none", label_smoothing=0.1)(logits.cls, logits.labels)
    assert_close(out.loss, cross_entropy_by_hand(logits.cls, logits.labels, smoothing=0.1))
    assert abs(out.loss.item() - cross_entropy_by_hand(logits.cls, logits.labels).item()) > 1e-3


def test_soft_labels_are_used_as_given_without_extra_smoothing(logits):
    targets = torch.softmax(torch.randn(B, C), dim=-1)
    out = DistillationLoss("soft", alpha=0.5, label_smoothing=0.1)(two_heads(logits), targets, logits.teacher)
    assert_close(out.base_loss, cross_entropy_by_hand(logits.cls, targets))


def test_soft_labels_with_wrong_class_count_are_rejected(logits):
    with pytest.raises(ValueError, match="num_classes=10"):
        DistillationLoss("none")(logits.cls, torch.full((B, 7), 1 / 7))


@pytest.mark.parametrize(
    "student",
    [
        lambda t: SimpleNamespace(cls_logits=t.cls, distillation_logits=None),
        lambda t: SimpleNamespace(logits=t.cls),
        lambda t: t.cls,
    ],
    ids=["no-dist-token", "logits-attribute", "tensor"],
)
@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_single_head_model_gets_both_terms_on_its_one_head(logits, student, kind):
    out = DistillationLoss(kind, alpha=0.3, tau=2.0)(student(logits), logits.labels, logits.teacher)
    base = cross_entropy_by_hand(logits.cls, logits.labels)
    if kind == "soft":
        dist = soft_kl_by_hand(logits.cls, logits.teacher, 2.0, "numel")
    else:
        dist = cross_entropy_by_hand(logits.cls, logits.teacher.argmax(dim=-1))
    assert_close(out.loss, 0.7 * base + 0.3 * dist)


def test_none_single_head_is_plain_cross_entropy(logits):
    out = DistillationLoss("none")(SimpleNamespace(logits=logits.cls), logits.labels)
    assert_close(out.loss, cross_entropy_by_hand(logits.cls, logits.labels))
    assert out.distillation_loss.item() == 0.0


def test_none_trains_both_heads_on_labels_so_every_parameter_gets_a_gradient(logits):
    cls = logits.cls.clone().requires_grad_()
    dist = logits.dist.clone().requires_grad_()
    out = DistillationLoss("none", alpha=0.9)(
        SimpleNamespace(cls_logits=cls, distillation_logits=dist), logits.labels, logits.teacher
    )
    expected = 0.5 * cross_entropy_by_hand(logits.cls, logits.labels) + 0.5 * cross_entropy_by_hand(
        logits.dist, logits.labels
    )
    assert_close(out.loss, expected)
    out.loss.backward()
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_gradients_reach_both_heads_and_never_the_teacher(logits, kind):
    cls = logits.cls.clone().requires_grad_()
    dist = logits.dist.clone().requires_grad_()
    teacher = logits.teacher.clone().requires_grad_()
    out = DistillationLoss(kind)(
        SimpleNamespace(cls_logits=cls, distillation_logits=dist), logits.labels, teacher
    )
    out.loss.backward()
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0
    assert teacher.grad is None
    assert not out.base_loss.requires_grad and not out.distillation_loss.requires_grad


def test_low_precision_logits_are_computed_in_float32(logits):
    student = SimpleNamespace(cls_logits=logits.cls.bfloat16(), distillation_logits=logits.dist.bfloat16())
    out = DistillationLoss("soft")(student, logits.labels, logits.teacher.half())
    assert out.loss.dtype == torch.float32
    reference = DistillationLoss("soft")(
        SimpleNamespace(
            cls_logits=logits.cls.bfloat16().float(), distillation_logits=logits.dist.bfloat16().float()
        ),
        logits.labels,
        logits.teacher.half().float(),
    )
    assert_close(out.loss, reference.loss)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_missing_teacher_logits_says_how_to_fix_it(logits, kind):
    with pytest.raises(ValueError, match=r"needs teacher_logits.*distillation_type='none'"):
        DistillationLoss(kind)(two_heads(logits), logits.labels)


def test_teacher_with_other_class_count_names_both_counts(logits):
    with pytest.raises(ValueError, match=r"\(7 classes\).*\(10 classes\)"):
        DistillationLoss("hard")(two_heads(logits), logits.labels, torch.randn(B, 7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distillation_type": "medium"}, "distillation_type must be one of"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"kl_reduction": "mean"}, "kl_reduction must be one of"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationLoss(**kwargs)


def test_output_without_logits_is_rejected(logits):
    with pytest.raises(TypeError, match="neither `cls_logits` nor `logits`"):
        DistillationLoss("none")(SimpleNamespace(scores=logits.cls), logits.labels)
