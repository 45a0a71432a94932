"""Actor and critic models on megatron-core, built from Hugging Face configs."""

from megatron_gad.models.transformer import (
    SUPPORTED_ARCHITECTURES,
    ModelArgs,
    UnsupportedModelError,
    layer_spec,
    model_args_from_hf,
    transformer_config_from_hf,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelArgs",
    "UnsupportedModelError",
    "layer_spec",
    "model_args_from_hf",
    "transformer_config_from_hf",
]
