"""Megatron ``TransformerConfig`` and layer spec from a Hugging Face model config.

Supported architectures: Llama, Mistral, Qwen2 and Qwen3 (RMSNorm, SwiGLU, RoPE, GQA; QKV bias
for Qwen2; per-head QK RMSNorm for Qwen3; tied or untied embeddings). The vocabulary is padded to
a multiple of :data:`VOCAB_PAD_MULTIPLE` that does not depend on TP, so one checkpoint loads at
every TP size; padded logits are never sampled (see :mod:`megatron_gad.ops.logprobs`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_gad.errors import UserError

logger = logging.getLogger(__name__)

#: Padded vocab = ceil(vocab / 128) * 128 at every TP size (TP must divide 128).
VOCAB_PAD_MULTIPLE = 128

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(UserError, ValueError):
    """The Hugging Face config describes a model this package cannot build."""


@dataclass(frozen=True)
class ModelArgs:
    """One model, read once from its HF config by :func:`model_args_from_hf`.

    The one description of a model in this package: the Megatron ``TransformerConfig``
    (:meth:`transformer_config`), ``GPTModel``'s own arguments (:mod:`megatron_gad.models.actor`)
    and the HF <-> Megatron tensor shapes (:mod:`megatron_gad.models.hf_mapping`) all come from it.
    """

    architecture: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    groups: int  # key/value heads (query groups)
    head_dim: int
    vocab: int
    padded_vocab: int  # vocab rounded up to a multiple of VOCAB_PAD_MULTIPLE
    tied: bool  # word embeddings shared with the output layer
    qkv_bias: bool  # qwen2
    qk_norm: bool  # qwen3: per-head RMSNorm of queries and keys
    max_positions: int
    rotary_base: float
    rope_scaling_factor: float | None  # llama3-style scaling when set
    norm_eps: float
    init_std: float

    @property
    def q_per_group(self) -> int:
        """Query heads per key/value group."""
        return self.heads // self.groups

    def transformer_config(
        self, tp: int = 1, pp: int = 1, params_dtype: torch.dtype | None = None, **overrides: Any
    ):
        """The megatron ``TransformerConfig`` of this model at the given TP/PP.

        ``params_dtype`` defaults to bf16 on CUDA and fp32 on CPU. ``overrides`` are passed
        through to ``TransformerConfig`` (for example ``recompute_granularity``). Raises
        ValueError when the layout cannot divide the model (see :func:`check_divisibility`).
        """
        from megatron.core.transformer import TransformerConfig

        check_divisibility(tp=tp, pp=pp, heads=self.heads, groups=self.groups, layers=self.layers)
        cuda = torch.cuda.is_available()
        dtype = params_dtype or (torch.bfloat16 if cuda else torch.float32)
        kwargs: dict[str, Any] = dict(
            num_layers=self.layers,
            hidden_size=self.hidden,
            ffn_hidden_size=self.ffn,
            num_attention_heads=self.heads,
            num_query_groups=self.groups,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_norm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_std,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            pipeline_dtype=dtype,
            attention_softmax_in_fp32=True,
            apply_query_key_layer_scaling=False,
            use_cpu_initialization=not cuda,
            gradient_accumulation_fusion=False,
            bias_activation_fusion=cuda,
            masked_softmax_fusion=False,
            bias_dropout_fusion=cuda,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            batch_p2p_comm=True,
            batch_p2p_sync=cuda,
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    value = getattr(hf_config, name, default)
    return default if value is None else value


def _rope_params(hf_config: Any) -> tuple[float, float | None]:
    """(rope theta, llama3 scaling factor or None); transformers 4.x and 5.x layouts."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0))
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "llama3":
        factor = params.get("factor", scaling.get("factor"))
        if factor != 8.0:
            raise UnsupportedModelError(
                f"llama3 rope scaling with factor {factor}: megatron-core supports factor 8 only"
            )
        return float(theta), float(factor)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (default, llama3)")


def model_args_from_hf(hf_config: Any) -> ModelArgs:
    """Validate an HF config and read the model from it. Raises UnsupportedModelError."""
    arch = getattr(hf_config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if _get(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {hf_config.hidden_act!r}: only silu (SwiGLU) is supported")
    if arch in ("llama", "mistral") and _get(hf_config, "attention_bias", False):
        raise UnsupportedModelError("attention_bias=True is not supported for llama/mistral")
    if _get(hf_config, "mlp_bias", False):
        raise UnsupportedModelError("mlp_bias=True is not supported")
    if arch in ("qwen2", "qwen3") and _get(hf_config, "use_sliding_window", False):
        raise UnsupportedModelError("use_sliding_window=True is not supported")
    window = _get(hf_config, "sliding_window", None) if arch == "mistral" else None
    if window is not None and window < int(_get(hf_config, "max_position_embeddings", 0)):
        logger.warning(
            "mistral sliding_window=%d is not modelled (full causal attention): sequences longer "
            "than %d tokens will differ from Hugging Face", window, window,
        )
    theta, factor = _rope_params(hf_config)
    vocab = int(hf_config.vocab_size)
    heads = int(hf_config.num_attention_heads)
    hidden = int(hf_config.hidden_size)
    return ModelArgs(
        architecture=arch,
        hidden=hidden,
        ffn=int(hf_config.intermediate_size),
        layers=int(hf_config.num_hidden_layers),
        heads=heads,
        groups=int(_get(hf_config, "num_key_value_heads", heads)),
        head_dim=int(_get(hf_config, "head_dim", hidden // heads)),
        vocab=vocab,
        padded_vocab=math.ceil(vocab / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE,
        tied=bool(_get(hf_config, "tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        max_positions=int(_get(hf_config, "max_position_embeddings", 4096)),
        rotary_base=theta,
        rope_scaling_factor=factor,
        norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        init_std=float(_get(hf_config, "initializer_range", 0.02)),
    )


def transformer_config_from_hf(
    hf_config: Any, tp: int = 1, pp: int = 1, params_dtype: torch.dtype | None = None, **overrides: Any
):
    """``model_args_from_hf(hf_config).transformer_config(...)``: the megatron ``TransformerConfig``
    equivalent to ``hf_config`` at the given TP/PP (see :meth:`ModelArgs.transformer_config`)."""
    return model_args_from_hf(hf_config).transformer_config(tp, pp, params_dtype, **overrides)


def check_divisibility(*, tp: int, pp: int, heads: int, groups: int, layers: int) -> None:
    """Raise ValueError naming what the TP/PP layout fails to divide."""
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads={heads} is not divisible by TP={tp}")
    if groups % tp:
        problems.append(f"num_key_value_heads={groups} is not divisible by TP={tp}")
    if layers % pp:
        problems.append(f"num_hidden_layers={layers} is not divisible by PP={pp}")
    if VOCAB_PAD_MULTIPLE % tp:
        problems.append(f"TP={tp} does not divide the vocab pad multiple {VOCAB_PAD_MULTIPLE}")
    if problems:
        raise ValueError("; ".join(problems))


def use_transformer_engine() -> bool:
    """True when Transformer Engine is importable and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(config: Any):
    """The transformer-layer ``ModuleSpec``: Transformer Engine's when usable, else the local one.

    Both specs take an explicit boolean attention mask ([B, 1, S, S], True = masked), which
    carries left padding of prompts and right padding of responses.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine():
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            qk_layernorm=config.qk_layernorm, normalization=config.normalization
        )
    _use_arbitrary_mask(spec)
    return spec


def _use_arbitrary_mask(spec: Any) -> None:
    """Make self-attention honour the full padding+causal mask we pass (not causal-only)."""
    from megatron.core.transformer.enums import AttnMaskType

    params = spec.submodules.self_attention.params
    params["attn_mask_type"] = AttnMaskType.arbitrary
