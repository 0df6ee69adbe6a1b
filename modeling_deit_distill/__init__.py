"""DeiT with a distillation token as a Hugging Face transformers model.

Importing this package registers the model with the Auto classes, and `save_pretrained` writes the model's
code next to the weights so a saved directory or Hub repo loads with `trust_remote_code=True` alone.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_deit_distill import DeiTDistillConfig
from .convert_deit_distill import (
    from_timm,
    from_transformers_deit,
    from_transformers_state_dict,
    to_transformers_deit,
    to_transformers_vit,
)
from .image_processing import build_image_processor
from .modeling_deit_distill import (
    DeiTDistillForImageClassification,
    DeiTDistillImageClassifierOutput,
    DeiTDistillModel,
    DeiTDistillPreTrainedModel,
)
from .pipeline_deit_distill import DeiTDistillImageClassificationPipeline, attach_pipeline, to_rgb

AutoConfig.register(DeiTDistillConfig.model_type, DeiTDistillConfig, exist_ok=True)
AutoModel.register(DeiTDistillConfig, DeiTDistillModel, exist_ok=True)
AutoModelForImageClassification.register(DeiTDistillConfig, DeiTDistillForImageClassification, exist_ok=True)

# save_pretrained copies the code files and writes `auto_map` into config.json.
DeiTDistillConfig.register_for_auto_class()
DeiTDistillModel.register_for_auto_class("AutoModel")
DeiTDistillForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "DeiTDistillConfig",
    "DeiTDistillForImageClassification",
    "DeiTDistillImageClassificationPipeline",
    "DeiTDistillImageClassifierOutput",
    "DeiTDistillModel",
    "DeiTDistillPreTrainedModel",
    "attach_pipeline",
    "build_image_processor",
    "from_timm",
    "from_transformers_deit",
    "from_transformers_state_dict",
    "to_rgb",
    "to_transformers_deit",
    "to_transformers_vit",
]
