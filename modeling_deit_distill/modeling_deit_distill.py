"""DeiT with a distillation token (Touvron et al., "Training data-efficient image transformers & distillation
through attention", ICML 2021), as a transformers model that can be trained.

The token sequence is `[CLS, DIST, patch_1 ... patch_N]`; the CLS output feeds `cls_classifier`, the DIST output
feeds `distillation_classifier`, and inference averages the two. With `use_distillation_token=False` the model is
a plain ViT with one head.

This file ships to the Hub with every checkpoint (`trust_remote_code`), so it imports only torch and
transformers, and its sibling configuration file through a flat relative import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_deit_distill import DeiTDistillConfig
from .image_processing import build_image_processor


@dataclass
class DeiTDistillImageClassifierOutput(ModelOutput):
    r"""Output of [`DeiTDistillForImageClassification`].

    Args:
        loss: Supervised loss when `labels` are given (see [`DeiTDistillForImageClassification.forward`]).
        logits: The logits selected by `config.inference_head`; the average of both heads by default.
        cls_logits: Logits of the head on the CLS token.
        distillation_logits: Logits of the head on the DIST token (`None` without a distillation token).
        hidden_states: Embedding output and the output of every block, when requested.
        attentions: Attention probabilities of every block, when requested.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cls_logits: torch.Tensor | None = None
    distillation_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def resize_position_embeddings(
    position_embeddings: torch.Tensor,
    num_prefix_tokens: int,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
) -> torch.Tensor:
    """Bicubic resize of the patch rows of a `(1, prefix + H*W, D)` table; the CLS/DIST rows are kept as they are."""
    if old_grid == new_grid:
        return position_embeddings
    prefix, patches = position_embeddings[:, :num_prefix_tokens], position_embeddings[:, num_prefix_tokens:]
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    # Interpolate in float32: bicubic is not implemented for half precision on every device.
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(patches.dtype)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, patches], dim=1)


class DeiTDistillPatchEmbeddings(nn.Module):
    """Non-overlapping patches through a strided convolution, flattened to `(batch, num_patches, hidden)`."""

    def __init__(self, config: DeiTDistillConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected pixel_values of shape (batch, {self.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}; convert images to {self.num_channels} channels (e.g. RGB) first."
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class DeiTDistillEmbeddings(nn.Module):
    """Patch embeddings with the CLS (and DIST) tokens prepended and the learned position embedding added."""

    def __init__(self, config: DeiTDistillConfig) -> None:
        super().__init__()
        self.patch_embeddings = DeiTDistillPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_distillation_token else None
        )
        self.num_prefix_tokens = config.num_prefix_tokens
        self.patch_size = config.patch_size
        self.grid_size = tuple(side // config.patch_size for side in config.image_hw)
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, config.num_patches + self.num_prefix_tokens, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        grid = (height // self.patch_size, width // self.patch_size)
        if grid != self.grid_size and not interpolate_pos_encoding:
            expected = (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model ({expected[0]}x{expected[1]}); "
                "resize the images, pass interpolate_pos_encoding=True, or call model.set_input_size(...)."
            )
        embeddings = self.patch_embeddings(pixel_values)
        batch_size = embeddings.shape[0]
        prefix = [self.cls_token.expand(batch_size, -1, -1)]
        if self.distillation_token is not None:
            prefix.append(self.distillation_token.expand(batch_size, -1, -1))
        embeddings = torch.cat([*prefix, embeddings], dim=1)
        position_embeddings = resize_position_embeddings(
            self.position_embeddings, self.num_prefix_tokens, self.grid_size, grid
        )
        return self.dropout(embeddings + position_embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention on `(batch, heads, seq, head_dim)` inputs; returns `(batch, seq, heads, head_dim)`."""
    attn_weights = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DeiTDistillAttention(nn.Module):
    """Multi-head self-attention with one fused query/key/value projection (rows ordered q, k, v as in timm)."""

    def __init__(self, config: DeiTDistillConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_probs_dropout_prob
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        attention_interface: Callable = eager_attention_forward
        # Fused kernels do not expose the probabilities, so a call that asks for them takes the eager path.
        if self.config._attn_implementation not in (None, "eager") and not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        attn_output = self.o_proj(attn_output.reshape(batch_size, seq_len, -1))
        return attn_output, attn_weights if output_attentions else None


class DeiTDistillMLP(nn.Module):
    def __init__(self, config: DeiTDistillConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class DeiTDistillDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training (Huang et al., 2016)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class DeiTDistillLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: `x + drop_path(attn(norm(x)))`, then `x + drop_path(mlp(norm(x)))`."""

    def __init__(self, config: DeiTDistillConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DeiTDistillAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DeiTDistillMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = DeiTDistillDropPath(drop_path_rate)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Each branch output is consumed by its residual add at once, so no block-sized tensor outlives its use.
        residual = hidden_states
        hidden_states, attn_weights = self.attention(self.layernorm_before(hidden_states), output_attentions)
        hidden_states = residual + self.drop_path(self.dropout(hidden_states))
        residual = hidden_states
        hidden_states = self.mlp(self.layernorm_after(hidden_states))
        hidden_states = residual + self.drop_path(self.dropout(hidden_states))
        return hidden_states, attn_weights


class DeiTDistillPreTrainedModel(PreTrainedModel):
    config_class = DeiTDistillConfig
    config: DeiTDistillConfig
    base_model_prefix = "deit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeiTDistillEmbeddings", "DeiTDistillLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated normal (std `initializer_range`) for tokens, position embedding and projections (DeiT/timm).

        transformers' own DeiT zeroes the tokens and position embedding, which only suits loading weights;
        training from scratch needs the random init of the paper.
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DeiTDistillEmbeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.distillation_token is not None:
                init.trunc_normal_(module.distillation_token, mean=0.0, std=std)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters the DeiT recipe trains without weight decay.

        These are the CLS and DIST tokens, the position embedding, every LayerNorm parameter and every bias;
        i.e. all parameters with fewer than two dimensions plus the tokens and the position embedding.
        """
        special = ("cls_token", "distillation_token", "position_embeddings")
        return {
            name
            for name, param in self.named_parameters()
            if param.ndim <= 1 or name.rsplit(".", 1)[-1] in special
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the DeiT image-processor config when the directory has none.

        The pipeline needs preprocessing next to the weights. A processor saved by the caller (the Trainer saves
        its `processing_class` right after the model) replaces this default.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        processor_file = os.path.join(save_directory, "preprocessor_config.json")
        if kwargs.get("is_main_process", True) and not os.path.exists(processor_file):
            build_image_processor(self.config).save_pretrained(save_directory)

    def set_input_size(self, image_size: int | tuple[int, int]) -> None:
        """Change the input resolution in place (e.g. 224 -> 384 for fine-tuning).

        The patch rows of the position embedding are resized bicubically; the CLS/DIST rows are kept.
        """
        new_config = self.config.__class__(**{**self.config.to_dict(), "image_size": image_size})
        embeddings: DeiTDistillEmbeddings = self.base_model.embeddings
        new_grid = tuple(side // new_config.patch_size for side in new_config.image_hw)
        with torch.no_grad():
            resized = resize_position_embeddings(
                embeddings.position_embeddings.data,
                embeddings.num_prefix_tokens,
                embeddings.grid_size,
                new_grid,
            )
        embeddings.position_embeddings = nn.Parameter(resized)
        embeddings.grid_size = new_grid
        self.config.image_size = new_config.image_size


class DeiTDistillModel(DeiTDistillPreTrainedModel):
    """The DeiT backbone: embeddings, blocks and the final LayerNorm; returns all tokens."""

    def __init__(self, config: DeiTDistillConfig) -> None:
        super().__init__(config)
        self.embeddings = DeiTDistillEmbeddings(config)
        depth = config.num_hidden_layers
        # Stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last.
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([DeiTDistillLayer(config, rate) for rate in rates])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> DeiTDistillPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        output_attentions = (
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)

        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        all_hidden_states = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, output_attentions)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if output_attentions:
                all_attentions.append(attn_weights)
        hidden_states = self.layernorm(hidden_states)

        output = BaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class DeiTDistillForImageClassification(DeiTDistillPreTrainedModel):
    """DeiT backbone with a linear head on the CLS token and, with the distillation token, one on DIST."""

    def __init__(self, config: DeiTDistillConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.deit = DeiTDistillModel(config)
        self.cls_classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.distillation_classifier = (
            nn.Linear(config.hidden_size, config.num_labels) if config.use_distillation_token else None
        )
        self.post_init()

    def forward_head(self, sequence_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the CLS head and of the DIST head (`None` without a distillation token)."""
        cls_logits = self.cls_classifier(sequence_output[:, 0])
        if self.distillation_classifier is None:
            return cls_logits, None
        return cls_logits, self.distillation_classifier(sequence_output[:, 1])

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DeiTDistillImageClassifierOutput | tuple:
        r"""
        labels: Class indices of shape `(batch,)`, or soft targets of shape `(batch, num_labels)` (mixup, label
            smoothing). Without a teacher the loss is the cross-entropy of the CLS head, averaged 50/50 with
            the cross-entropy of the DIST head when there is one, so every parameter receives a gradient.
            Teacher-guided losses live in `training.DistillationLoss`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.deit(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        cls_logits, distillation_logits = self.forward_head(outputs.last_hidden_state)
        if distillation_logits is None:
            logits = cls_logits
        else:
            logits = {
                "average": (cls_logits + distillation_logits) / 2,
                "cls": cls_logits,
                "distillation": distillation_logits,
            }[self.config.inference_head]

        loss = None
        if labels is not None:
            loss = self.supervised_loss(cls_logits, labels)
            if distillation_logits is not None:
                loss = (loss + self.supervised_loss(distillation_logits, labels)) / 2

        output = DeiTDistillImageClassifierOutput(
            loss=loss,
            logits=logits,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices or soft targets, with a clear error for mismatched labels."""
        labels = labels.to(logits.device)
        if labels.is_floating_point() and labels.ndim == 2:
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Soft labels have shape {tuple(labels.shape)} but the model predicts {self.num_labels} "
                    f"classes (logits {tuple(logits.shape)}); build targets with num_classes={self.num_labels}."
                )
            return F.cross_entropy(logits.float(), labels.float())
        labels = labels.long().view(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_labels):
            raise ValueError(
                f"Labels must be class indices in [0, {self.num_labels}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]; set num_labels/id2label to match the dataset."
            )
        return F.cross_entropy(logits.float(), labels)


__all__ = [
    "DeiTDistillForImageClassification",
    "DeiTDistillImageClassifierOutput",
    "DeiTDistillModel",
    "DeiTDistillPreTrainedModel",
]
