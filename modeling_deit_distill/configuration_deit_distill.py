"""Configuration of DeiT with a distillation token (Touvron et al., 2021).

This file ships to the Hub with every checkpoint (`trust_remote_code`), so it imports only transformers.
"""

from typing import Any

from transformers import PreTrainedConfig

# The dataclass validator transformers' own configs use (huggingface_hub's `strict`), taken through transformers
# so that the shipped file needs nothing else.
from transformers.configuration_utils import strict

INFERENCE_HEADS = ("average", "cls", "distillation")

# Depth 12, patch 16, image 224 for every variant (paper, Table 1).
VARIANTS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 192, "num_attention_heads": 3},
    "small": {"hidden_size": 384, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_attention_heads": 12},
}


def _as_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


@strict
class DeiTDistillConfig(PreTrainedConfig):
    r"""Configuration of [`DeiTDistillModel`] and [`DeiTDistillForImageClassification`].

    Args:
        image_size: Input resolution (int or (height, width)).
        patch_size: Side of the square patches; the image must be divisible by it.
        num_channels: Input channels.
        hidden_size: Token width; must be divisible by `num_attention_heads`.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Attention heads per block.
        intermediate_size: MLP width. Defaults to `mlp_ratio * hidden_size`.
        mlp_ratio: Used only when `intermediate_size` is not given.
        hidden_act: MLP activation.
        qkv_bias: Bias on the query/key/value projection.
        layer_norm_eps: LayerNorm epsilon (1e-6 as in the paper and timm).
        hidden_dropout_prob: Dropout on embeddings and block outputs (0 in the DeiT recipe).
        attention_probs_dropout_prob: Dropout on attention probabilities.
        drop_path_rate: Stochastic depth rate of the last block; block `i` uses `rate * i / (depth - 1)`.
        initializer_range: Std of the truncated-normal init of tokens, position embedding and linear layers.
        use_distillation_token: Adds the DIST token and its head. `False` gives a plain ViT (the paper's
            "no distillation" and "usual distillation" rows).
        inference_head: Which logits `logits` holds: `"average"` of both heads (the paper's default),
            `"cls"` or `"distillation"`.

    Validation follows transformers: field types are checked on assignment, and the `validate_*` methods run
    from `config.validate()`, which `save_pretrained` and building a model call. Construction itself accepts
    partial arguments (`DeiTDistillConfig(hidden_size=32)`, as `DeiTConfig(hidden_size=32)`) so a config can
    be completed field by field before it is used.
    """

    model_type = "deit_distill"

    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    mlp_ratio: float | int = 4.0
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    initializer_range: float = 0.02
    use_distillation_token: bool = True
    inference_head: str = "average"

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.image_size, tuple):
            self.image_size = list(self.image_size)
        if self.intermediate_size is None:
            self.intermediate_size = int(self.hidden_size * self.mlp_ratio)
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Shapes that cannot be built: the field, the value and the fix."""
        for name in (
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DeiTDistillConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"DeiTDistillConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick a hidden_size that is a multiple of the head count, e.g. "
                f"{self.num_attention_heads * max(1, round(self.hidden_size / self.num_attention_heads))}."
            )
        height, width = self.image_hw
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"DeiTDistillConfig.image_size ({height}x{width}) must be divisible by patch_size "
                f"({self.patch_size}); resize the images or choose a patch_size that divides both sides."
            )

    def validate_inference_head(self) -> None:
        if self.inference_head not in INFERENCE_HEADS:
            raise ValueError(
                f"DeiTDistillConfig.inference_head must be one of {INFERENCE_HEADS}, got {self.inference_head!r}."
            )
        if self.inference_head != "cls" and not self.use_distillation_token:
            raise ValueError(
                f"DeiTDistillConfig.inference_head={self.inference_head!r} needs the distillation token; "
                "set use_distillation_token=True or inference_head='cls'."
            )

    def validate_regularization(self) -> None:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"DeiTDistillConfig.{name} must be in [0, 1), got {value!r}.")

    @property
    def image_hw(self) -> tuple[int, int]:
        return _as_pair(self.image_size)

    @property
    def num_patches(self) -> int:
        height, width = self.image_hw
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS, plus DIST when the distillation token is used."""
        return 2 if self.use_distillation_token else 1

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> "DeiTDistillConfig":
        """The paper's DeiT-Ti/S/B (`"tiny"`, `"small"`, `"base"`), with any field overridden."""
        key = variant.lower().removeprefix("deit-").removeprefix("deit_")
        key = {"ti": "tiny", "s": "small", "b": "base"}.get(key, key)
        if key not in VARIANTS:
            raise ValueError(f"Unknown DeiT variant {variant!r}; choose one of {sorted(VARIANTS)}.")
        return cls(**{**VARIANTS[key], **overrides})


# `@strict` also runs `validate()` at the end of `__init__`; transformers' convention is that partial arguments
# construct (DeiTConfig(hidden_size=32) does), so keep the plain constructor and validate on use instead.
DeiTDistillConfig.__init__ = DeiTDistillConfig.__init__.__wrapped__
