"""HF config -> TransformerConfig, and last-valid-token scoring of the critic."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from megatron_gad.models import UnsupportedModelError, model_args_from_hf, transformer_config_from_hf
from megatron_gad.models.critic import last_token_index, place_at_last_token, sequence_scores


def test_fields_follow_the_hf_config() -> None:
    hf = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=5e5,
                     tie_word_embeddings=True)
    cfg = transformer_config_from_hf(hf, tp=2)
    args = model_args_from_hf(hf)
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.qk_layernorm, cfg.add_qkv_bias) == (2, 32, True, False)
    assert (args.padded_vocab, args.rotary_base, args.tied) == (384, 5e5, True)
    assert transformer_config_from_hf(Qwen2Config(num_hidden_layers=2, hidden_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=96)).add_qkv_bias


def test_unsupported_architecture_names_the_supported_ones() -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        model_args_from_hf(GPT2Config())


def test_layout_that_cannot_divide_the_model() -> None:
    hf = LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96)
    with pytest.raises(ValueError, match="num_hidden_layers=3 is not divisible by PP=2"):
        transformer_config_from_hf(hf, pp=2)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by TP=4"):
        transformer_config_from_hf(hf, tp=4)


def test_last_token_scoring_including_empty_response() -> None:
    prompt_len = 3
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_token_index(response_mask, prompt_len).tolist() == [4, 6, 2]
    token_scores = torch.arange(3 * 7, dtype=torch.float32).view(3, 7)
    assert sequence_scores(token_scores, response_mask, prompt_len).tolist() == [4.0, 13.0, 16.0]
    placed = place_at_last_token(torch.tensor([5.0, 6.0, 7.0]), response_mask)
    assert placed.tolist() == [[0, 5, 0, 0], [0, 0, 0, 6], [0, 0, 0, 0]]
