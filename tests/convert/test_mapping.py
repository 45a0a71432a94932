"""The HF <-> Megatron name mapping on real transformers state dicts (no process groups).

The fused-QKV layout is checked against an explicit per-head loop; round trips must be bit-exact
with the exact key set that ``save_pretrained`` writes (pitfall: export with wrong key names).
"""

from __future__ import annotations

import pytest
import torch

from megatron_gad.models import hf_mapping as hfm

VOCAB = 200


def tiny_config(arch: str, tied: bool, num_labels: int | None = None):
    """A 2-layer GQA config (4 query heads, 2 groups), vocab 200 (padded to 256)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    extra = {"head_dim": 24} if arch == "qwen3" else {}
    config = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **extra)
    if num_labels is not None:
        config.num_labels = num_labels
    return config


def random_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor random (so no mapping hides behind ones/zeros)."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def saved_keys(model: torch.nn.Module) -> set[str]:
    """Keys ``save_pretrained`` writes: the state dict minus a tied ``lm_head.weight``."""
    keys = set(model.state_dict())
    if model.config.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return keys


def reference_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, d: int) -> torch.Tensor:
    """Slow, explicit fused layout: for each group, its query heads, then its k head, its v head."""
    rows = []
    per = heads // groups
    for g in range(groups):
        for h in range(g * per, (g + 1) * per):
            rows.append(q[h * d:(h + 1) * d])
        rows.append(k[g * d:(g + 1) * d])
        rows.append(v[g * d:(g + 1) * d])
    return torch.cat(rows)


CASES = [("llama", True), ("llama", False), ("mistral", False), ("qwen2", True), ("qwen3", False)]


@pytest.mark.parametrize("arch,tied", CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def test_actor_round_trip_bit_exact(arch: str, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, tied)
    model = AutoModelForCausalLM.from_config(config)
    state = random_state(model)
    meg = hfm.hf_to_megatron_state(state, config)
    assert list(meg) == [n for n in hfm.megatron_names(config, te=False) if n in meg]
    assert ("output_layer.weight" in meg) == (not tied)
    emb = meg["embedding.word_embeddings.weight"]
    assert emb.shape == (256, 64) and torch.equal(emb[:VOCAB], state["model.embed_tokens.weight"])
    assert not emb[VOCAB:].any(), "vocab padding rows must be zero"
    d = config.head_dim if arch == "qwen3" else 16
    ref = reference_qkv(*(state[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"), 4, 2, d)
    assert torch.equal(meg["decoder.layers.1.self_attention.linear_qkv.weight"], ref)
    back = {n: t for name, full in meg.items() for n, t in hfm.megatron_to_hf_tensors(name, full, config)}
    assert set(back) == saved_keys(model), set(back) ^ saved_keys(model)
    for name, t in back.items():
        assert torch.equal(t, state[name]), name


def test_critic_round_trip_and_names() -> None:
    """Critic: ``trunk.``-prefixed trunk, head.norm <- model.norm, head.score <- score [1, hidden]."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("qwen2", True, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config)
    state = random_state(model)
    meg = hfm.hf_to_megatron_state(state, config, role="critic")
    assert torch.equal(meg["head.score.weight"], state["score.weight"]) and meg["head.score.weight"].shape == (1, 64)
    assert torch.equal(meg["head.norm.weight"], state["model.norm.weight"])
    assert all(n.startswith("trunk.") for n in meg if not n.startswith("head."))
    assert "trunk.decoder.final_layernorm.weight" not in meg and "output_layer.weight" not in meg
    back = {n: t for name, full in meg.items() for n, t in hfm.megatron_to_hf_tensors(name, full, config, "critic")}
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(t, state[n]) for n, t in back.items())


def test_transformer_engine_names_and_tied_output() -> None:
    config = tiny_config("llama", True)
    norm = torch.randn(64)
    out = hfm.megatron_to_hf_tensors("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", norm, config)
    assert [n for n, _ in out] == ["model.layers.1.input_layernorm.weight"]
    out = hfm.megatron_to_hf_tensors("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", norm, config)
    assert [n for n, _ in out] == ["model.layers.0.post_attention_layernorm.weight"]
    assert hfm.megatron_to_hf_tensors("output_layer.weight", torch.zeros(256, 64), config) == []
    te = hfm.megatron_names(config, te=True)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert not any("input_layernorm" in n for n in te)


def test_errors_name_the_tensor() -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", False)
    with pytest.raises(ValueError, match="unknown Megatron tensor 'decoder.layers.2.mlp.linear_fc2.weight'"):
        hfm.megatron_to_hf_tensors("decoder.layers.2.mlp.linear_fc2.weight", torch.zeros(64, 96), config)
    with pytest.raises(ValueError, match="unknown Megatron tensor 'head.score.weight'"):
        hfm.megatron_to_hf_tensors("head.score.weight", torch.zeros(1, 64), config)
    with pytest.raises(ValueError, match="'decoder.layers.0.mlp.linear_fc1.weight' has shape"):
        hfm.megatron_to_hf_tensors("decoder.layers.0.mlp.linear_fc1.weight", torch.zeros(100, 64), config)
    state = random_state(AutoModelForCausalLM.from_config(config))
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\), expected \(32, 64\)"):
        hfm.hf_to_megatron_state(state, config)
    del state["lm_head.weight"]
    state["model.layers.7.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing 1 tensor.*lm_head.weight.*unexpected 1 tensor.*layers.7.extra"):
        hfm.hf_to_megatron_state(state, config)
    with pytest.raises(ValueError, match="role 'reward'"):
        hfm.hf_to_megatron_state(state, config, role="reward")
