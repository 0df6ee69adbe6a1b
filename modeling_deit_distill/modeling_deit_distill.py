"""DeiT with a distillation token (Touvron et al., "Training data-efficient image transformers & distillation
through attention", ICML 2021), as a transformers model that can be trained.

The token sequence is `[CLS, DIST, patch_1 ... patch_N]`; the CLS output feeds `cls_classifier`, the DIST output
feeds `distillation_classifier`, and inference averages the two. With `use_distillation_token=False` the model is
a plain ViT with one head.

It offers timm's model API as well (`forward_features`, `forward_head`, `forward_intermediates`,
`reset_classifier`, `group_matcher`, `no_weight_decay`), so timm's optimizer helpers and feature-extraction
habits work unchanged.

This file ships to the Hub with every checkpoint (`trust_remote_code`), so it imports only torch and
transformers, and its sibling files (the configuration and the image-processor builder) through flat relative
imports.
"""

import importlib
import os
import re
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
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

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
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        attention_interface: Callable = eager_attention_forward
        # Fused kernels do not expose the probabilities, so a call that asks for them takes the eager path
        # (transformers' DeiT would return no attentions there).
        if self.config._attn_implementation not in (None, "eager") and not kwargs.get("output_attentions"):
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(batch_size, seq_len, -1))
        return attn_output, attn_weights


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
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        # Each branch output is consumed by its residual add at once, so no block-sized tensor outlives its use.
        residual = hidden_states
        hidden_states, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = residual + self.drop_path(self.dropout(hidden_states))
        residual = hidden_states
        hidden_states = self.mlp(self.layernorm_after(hidden_states))
        return residual + self.drop_path(self.dropout(hidden_states))


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
    # `output_hidden_states` / `output_attentions` are recorded by hooks on these modules (transformers 5).
    _can_record_outputs = {"hidden_states": DeiTDistillLayer, "attentions": DeiTDistillAttention}
    _input_embed_layer = "patch_embeddings"

    def __init__(self, config: DeiTDistillConfig, *inputs, **kwargs) -> None:
        # Construction of a config accepts partial arguments; a model is where it must be complete.
        config.validate()
        super().__init__(config, *inputs, **kwargs)

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

    @property
    def _backbone_prefix(self) -> str:
        """Prefix of the backbone's parameter names in this model ("" on the backbone itself)."""
        return "" if self.base_model is self else f"{self.base_model_prefix}."

    def no_weight_decay(self) -> set[str]:
        """timm's contract: the names (in `named_parameters()`) of the matrices trained without weight decay.

        These are the CLS and DIST tokens and the position embedding. Norm weights and biases are not listed:
        like timm's optimizer factory (`weight_decay_exclude_1d`), `deit_distill.training.optim` and `DistillationTrainer`
        exempt every parameter with fewer than two dimensions on top of these names.
        """
        special = ("cls_token", "distillation_token", "position_embeddings")
        prefix = f"{self._backbone_prefix}embeddings."
        return {name for name, _ in self.named_parameters() if name.removeprefix(prefix) in special}

    def group_matcher(self, coarse: bool = False) -> dict[str, str | list[tuple[str, tuple[int] | None]]]:
        """timm's parameter grouping: embeddings first, one group per block, the final norm with the last block.

        Parameters matched by no pattern (the heads) come last, which is how timm's `param_groups_layer_decay`
        treats DeiT's heads. `coarse` is accepted for timm's signature; blocks are single groups either way.
        """
        prefix = re.escape(self._backbone_prefix)
        return {
            "stem": rf"^{prefix}embeddings\.",
            "blocks": [(rf"^{prefix}layers\.(\d+)\.", None), (rf"^{prefix}layernorm\.", (99999,))],
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the DeiT image-processor config when the directory has none,
        and the project's image-classification pipeline (`attach_pipeline`), so that
        `pipeline(..., trust_remote_code=True)` on the folder decodes images as training does.

        The pipeline needs preprocessing next to the weights. A processor saved by the caller (the Trainer saves
        its `processing_class` right after the model) replaces this default. The transformers-native copies
        (`to_transformers_deit`, `to_transformers_vit`) are transformers' own classes and get neither.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        processor_file = os.path.join(save_directory, "preprocessor_config.json")
        if not os.path.exists(processor_file):
            build_image_processor(self.config).save_pretrained(save_directory)
        # Imported by name, not `from .pipeline...`: a relative import would make the pipeline (and its PIL and
        # NumPy imports) a requirement of loading the model with remote code.
        try:
            pipeline_module = importlib.import_module(f"{__package__}.pipeline_deit_distill")
        except ImportError:  # remote code of a repo saved without the pipeline file
            return
        pipeline_module.attach_pipeline(save_directory)

    def set_input_size(self, image_size: int | tuple[int, int]) -> None:
        """Change the input resolution in place (e.g. 224 -> 384 for fine-tuning).

        The patch rows of the position embedding are resized bicubically; the CLS/DIST rows are kept.
        """
        new_config = self.config.__class__(**{**self.config.to_dict(), "image_size": image_size})
        new_config.validate()
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

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        r"""
        `output_hidden_states` (a flag, or the indices of the hidden states to keep: 0 is the embedding output,
        `i + 1` the output of block `i`, before the final norm), `output_attentions` and `return_dict` are
        handled by transformers' output capturing, exactly as in its DeiT.
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required.")
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        for layer in self.layers:
            hidden_states = layer(hidden_states, None, **kwargs)
        return BaseModelOutput(last_hidden_state=self.layernorm(hidden_states))


def _take_indices(num_blocks: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """timm's convention: `None` is every block, an int `n` the last `n` blocks, a list those blocks."""
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices} must select between 1 and {num_blocks} blocks.")
        return list(range(num_blocks - indices, num_blocks))
    taken = [index % num_blocks if -num_blocks <= index < 0 else index for index in indices]
    if any(not 0 <= index < num_blocks for index in taken):
        raise ValueError(f"indices={list(indices)} must be block indices in [-{num_blocks}, {num_blocks}).")
    return taken


class DeiTDistillForImageClassification(DeiTDistillPreTrainedModel):
    """DeiT backbone with a linear head on the CLS token and, with the distillation token, one on DIST.

    `num_labels=0` builds it headless (identity heads), a feature extractor as timm's `num_classes=0`:
    `logits` are then the pooled features (see `forward_head(..., pre_logits=True)`).
    """

    def __init__(self, config: DeiTDistillConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.deit = DeiTDistillModel(config)
        self.cls_classifier = self._new_head(config.num_labels)
        self.distillation_classifier = (
            self._new_head(config.num_labels) if config.use_distillation_token else None
        )
        self.post_init()

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.config.hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> tuple[nn.Module, nn.Module | None]:
        """The CLS head and the DIST head (`None` without a distillation token), as timm's distilled DeiT."""
        return self.cls_classifier, self.distillation_classifier

    def reset_classifier(self, num_classes: int) -> None:
        """New, freshly initialised heads for `num_classes` classes (0: headless), as timm's `reset_classifier`.

        `config.num_labels` follows, which resets `id2label`/`label2id` to generic names; set them after.
        """
        like = self.deit.embeddings.cls_token
        self.config.num_labels = num_classes
        self.num_labels = num_classes
        heads = [self._new_head(num_classes) for _ in range(2 if self.config.use_distillation_token else 1)]
        for head in heads:
            head.apply(self._init_weights)
            head.to(device=like.device, dtype=like.dtype)
        self.cls_classifier = heads[0]
        self.distillation_classifier = heads[1] if len(heads) > 1 else None

    def forward_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        """All tokens after the final norm, `(batch, prefix + patches, hidden)` (timm's `forward_features`)."""
        return self.deit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state

    def _head_logits(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cls_logits = self.cls_classifier(tokens[:, 0])
        if self.distillation_classifier is None:
            return cls_logits, None
        return cls_logits, self.distillation_classifier(tokens[:, 1])

    def _select(self, cls_output: torch.Tensor, distillation_output: torch.Tensor | None) -> torch.Tensor:
        """What `config.inference_head` reads from the two heads (or the two tokens)."""
        if distillation_output is None or self.config.inference_head == "cls":
            return cls_output
        if self.config.inference_head == "distillation":
            return distillation_output
        return (cls_output + distillation_output) / 2

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's `forward_head` on `forward_features` output: the logits `config.inference_head` selects.

        With `pre_logits=True`, the features the heads read, pooled the same way: the CLS token, the DIST
        token or their average (timm's distilled DeiT averages them).
        """
        if pre_logits:
            distillation_token = tokens[:, 1] if self.config.use_distillation_token else None
            return self._select(tokens[:, 0], distillation_token)
        return self._select(*self._head_logits(tokens))

    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs for dense tasks, as timm's `forward_intermediates`.

        Args:
            indices: `None` for every block, an int `n` for the last `n`, or a list of block indices.
            return_prefix_tokens: Return `(patch_map, prefix_tokens)` pairs, prefix being CLS (and DIST).
            norm: Apply the final LayerNorm to each intermediate.
            output_fmt: `"NCHW"` (`(batch, hidden, grid_h, grid_w)`) or `"NLC"` (`(batch, patches, hidden)`).
            intermediates_only: Return only the list, not `(forward_features output, list)`.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        take = _take_indices(self.config.num_hidden_layers, indices)
        # Hidden state i + 1 is the output of block i; the capture hooks keep only those asked for.
        outputs = self.deit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=[index + 1 for index in take],
        )
        num_prefix = self.config.num_prefix_tokens
        grid = (
            pixel_values.shape[-2] // self.config.patch_size,
            pixel_values.shape[-1] // self.config.patch_size,
        )
        intermediates = []
        for index in take:
            tokens = outputs.hidden_states[index + 1]
            if norm:
                tokens = self.deit.layernorm(tokens)
            prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
            if output_fmt == "NCHW":
                patches = patches.reshape(patches.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
            intermediates.append((patches, prefix) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        return outputs.last_hidden_state, intermediates

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DeiTDistillImageClassifierOutput:
        r"""
        labels: Targets for the supervised loss, read as transformers' image classifiers read them
            (`config.problem_type`): `"single_label_classification"` takes class indices `(batch,)` or soft
            targets `(batch, num_labels)`, `"multi_label_classification"` multi-hot floats (BCE with logits),
            `"regression"` floats (MSE). When `problem_type` is unset, float labels shaped like the logits are
            soft targets (Mixup/CutMix, label smoothing) and get soft-target cross-entropy, not BCE; anything
            else is resolved as transformers does (one label: regression; integer labels: single-label).
            Without a teacher the loss of the CLS head is averaged 50/50 with that of the DIST head when there
            is one, so every parameter receives a gradient. Teacher-guided losses live in
            `training.DistillationLoss`.
        """
        outputs: BaseModelOutput = self.deit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        cls_logits, distillation_logits = self._head_logits(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.supervised_loss(cls_logits, labels, **kwargs)
            if distillation_logits is not None:
                loss = (loss + self.supervised_loss(distillation_logits, labels, **kwargs)) / 2
        return DeiTDistillImageClassifierOutput(
            loss=loss,
            logits=self._select(cls_logits, distillation_logits),
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def supervised_loss(self, logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        """The loss of one head, following `config.problem_type` (see `forward`), with clear label errors."""
        if self.num_labels == 0:
            raise ValueError(
                "This model is headless (num_labels=0, a feature extractor) and has no loss; "
                "call reset_classifier(num_classes) to add heads before training on labels."
            )
        labels = labels.to(logits.device)
        problem_type = self.config.problem_type
        is_soft = labels.is_floating_point() and labels.ndim == 2 and self.num_labels > 1
        if is_soft and problem_type in (None, "single_label_classification"):
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Soft labels have shape {tuple(labels.shape)} but the model predicts {self.num_labels} "
                    f"classes (logits {tuple(logits.shape)}); build targets with num_classes={self.num_labels}."
                )
            return F.cross_entropy(logits.float(), labels.float())
        if problem_type is None and self.num_labels > 1:
            # Hard labels of any dtype are class indices here (transformers would send float labels to BCE).
            labels = labels.long()
        if labels.dtype in (torch.long, torch.int) and problem_type != "regression" and self.num_labels > 1:
            valid = labels[labels != -100]  # -100 is cross-entropy's ignore_index
            if valid.numel() and (valid.min() < 0 or valid.max() >= self.num_labels):
                raise ValueError(
                    f"Labels must be class indices in [0, {self.num_labels}), got values in "
                    f"[{int(valid.min())}, {int(valid.max())}]; set num_labels/id2label to match the dataset."
                )
        return self.loss_function(labels, logits.float(), self.config, **kwargs)


__all__ = [
    "DeiTDistillForImageClassification",
    "DeiTDistillImageClassifierOutput",
    "DeiTDistillModel",
    "DeiTDistillPreTrainedModel",
]
