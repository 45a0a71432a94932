"""Engine selection everywhere; the vLLM engine itself on a GPU (``gpu`` marker, needs vllm)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_gad.rollout.base import (
    RolloutConfig,
    RolloutConfigError,
    TokenSpec,
    make_rollout_engine,
    resolve_engine_name,
    vllm_unavailable_reason,
)

PAD, EOS, VOCAB = 0, 3, 256


def tiny_llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6,
        initializer_range=0.3, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1,
    )


def test_engine_selection_follows_vllm_availability() -> None:
    """``name=cpu`` is always the CPU engine; ``auto`` is vLLM exactly where it can run."""
    reason = vllm_unavailable_reason()
    assert resolve_engine_name(RolloutConfig(name="cpu")) == "cpu"
    assert resolve_engine_name(RolloutConfig()) == ("vllm" if reason is None else "cpu")
    with pytest.raises(RolloutConfigError, match=r"actor_rollout_ref.rollout.top_p must be in \(0, 1\]"):
        RolloutConfig(top_p=0.0).validate()
    engine = make_rollout_engine(RolloutConfig(name="cpu"), tiny_llama(), TokenSpec(PAD, (EOS,)))
    assert type(engine).__name__ == "CPURolloutEngine"


def test_clear_error_without_vllm() -> None:
    """Where vLLM cannot run, ``name=vllm`` is refused naming the key, and ``auto`` builds the CPU engine."""
    if vllm_unavailable_reason() is None:
        pytest.skip("vLLM can run here: the refusal cannot happen")
    with pytest.raises(RolloutConfigError, match="rollout.name=vllm cannot run here"):
        make_rollout_engine(RolloutConfig(name="vllm"), tiny_llama(), TokenSpec(PAD, (EOS,)))
    engine = make_rollout_engine(RolloutConfig(), tiny_llama(), TokenSpec(PAD, (EOS,)))
    assert type(engine).__name__ == "CPURolloutEngine"


def test_cpu_engine_rejects_unknown_and_missing_weights() -> None:
    from megatron_gad.rollout.cpu_engine import CPURolloutEngine

    engine = CPURolloutEngine(RolloutConfig(), tiny_llama(), TokenSpec(PAD, (EOS,)))
    with pytest.raises(KeyError, match="unknown weight 'model.layers.0.mlp.fc1.weight'"):
        engine.load_weights([[("model.layers.0.mlp.fc1.weight", torch.zeros(1))]])
    with pytest.raises(ValueError, match="weight 'model.norm.weight' has shape"):
        engine.load_weights([[("model.norm.weight", torch.zeros(3))]])
    with pytest.raises(ValueError, match="not received"):
        engine.load_weights([[("model.norm.weight", torch.ones(128))]])


def test_bucket_packing_round_trips_bit_exact() -> None:
    """The byte form that carries buckets to a vLLM engine core in another process."""
    from megatron_gad.rollout.vllm_engine import pack_bucket, unpack_bucket

    g = torch.Generator().manual_seed(0)
    fused = torch.randn(6, 4, generator=g)
    bucket = [("q", fused[:2]), ("k", fused[2:4].t()), ("norm", torch.randn(4, generator=g).bfloat16()),
              ("ids", torch.arange(3))]
    data = pack_bucket(bucket)
    assert isinstance(data, bytes)
    got = dict(unpack_bucket(memoryview(data)))
    assert sorted(got) == sorted(n for n, _ in bucket)
    for name, t in bucket:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_vllm_version_range_is_enforced() -> None:
    from megatron_gad.rollout.vllm_engine import check_vllm_version

    for ok in ("0.10.2", "0.11.0", "0.11.2", "0.12.0", "0.20.1", "0.33.0", "0.33.1"):
        check_vllm_version(ok)
    for bad in ("0.9.2", "0.10.1.1", "0.34.0", "1.0.0"):
        with pytest.raises(RolloutConfigError, match=f"vllm {bad} is installed"):
            check_vllm_version(bad)


def test_every_checked_release_is_supported_and_the_range_ends_at_the_last_checked_minor() -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from megatron_gad.rollout.vllm_engine import CHECKED_VLLM, SUPPORTED_VLLM

    spec = SpecifierSet(SUPPORTED_VLLM)
    versions = [Version(v) for v in CHECKED_VLLM]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert all(v in spec for v in versions)
    first, last = versions[0], versions[-1]
    assert Version(f"{first.major}.{first.minor}.{first.micro - 1}") not in spec if first.micro else True
    assert Version(f"{last.major}.{last.minor + 1}.0") not in spec


def test_invalid_sleep_level_is_refused_before_vllm_is_needed() -> None:
    from megatron_gad.rollout.vllm_engine import VLLMRolloutEngine

    with pytest.raises(RolloutConfigError, match=r"sleep level 3 is not one of \(1, 2\)"):
        VLLMRolloutEngine(RolloutConfig(name="vllm"), tiny_llama(), TokenSpec(PAD, (EOS,)), sleep_level=3)


gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None, reason="needs CUDA and vllm"
)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("in_process,sleep_level", [(True, 1), (False, 2)],
                         ids=["engine-in-process-sleep1", "engine-process-sleep2"])
def test_vllm_engine_matches_transformers_and_follows_weight_updates(in_process: bool, sleep_level: int) -> None:
    """Greedy tokens equal transformers' (fp32 on both sides); processed log-probs of sampled tokens
    agree with log_softmax(logits / T) of an HF forward; sleep/wake keeps the weights at level 1,
    and at level 2 (weights dropped) a load while asleep (weights woken before the KV cache)
    restores them; a new weight sync changes the output. Both placements of vLLM's engine core
    (this process, where buckets pass by reference; its own process, where they travel packed)."""
    from transformers import AutoModelForCausalLM

    from megatron_gad.rollout.vllm_engine import VLLMRolloutEngine

    torch.manual_seed(0)
    hf_cfg = tiny_llama()
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).cuda().eval()
    cfg = RolloutConfig(name="vllm", n=2, temperature=0.8, response_length=12, prompt_length=16, dtype="float32",
                        gpu_memory_utilization=0.3, max_num_seqs=16)
    engine = VLLMRolloutEngine(cfg, hf_cfg, TokenSpec(PAD, (EOS,)), in_process=in_process, sleep_level=sleep_level)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    engine.load_weights([named[:5], named[5:]])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = PAD

    greedy = engine.generate(ids, mask, n=1, greedy=True)
    for row in range(3):
        prompt = ids[row][mask[row].bool()][None].cuda()
        ref = model.generate(input_ids=prompt, do_sample=False, max_new_tokens=12, pad_token_id=PAD, eos_token_id=EOS)
        want = ref[0, prompt.shape[1]:].cpu()
        got = greedy.responses[row][greedy.response_mask[row].bool()]
        assert torch.equal(got, want[: got.numel()]), f"row {row}: {got} vs {want}"

    sampled = engine.generate(ids, mask, seed=7)
    assert sampled.responses.shape[0] == 6
    for row in range(6):
        prompt = ids[row // 2][mask[row // 2].bool()]
        resp = sampled.responses[row][sampled.response_mask[row].bool()]
        full = torch.cat([prompt, resp])[None].cuda()
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, prompt.numel() - 1: -1].float() / cfg.temperature
        ref = torch.log_softmax(logits, -1).gather(-1, resp.cuda()[:, None]).squeeze(-1).cpu()
        got = sampled.rollout_log_probs[row, : resp.numel()]
        assert (got - ref).abs().max() < 2e-3, f"row {row}: max diff {(got - ref).abs().max()}"

    engine.sleep()
    if sleep_level == 1:
        engine.wake()
    else:
        with pytest.raises(RuntimeError, match="load_weights must run before generate"):
            engine.generate(ids, mask, n=1, greedy=True)
        engine.load_weights([named])  # asleep: weights woken, loaded, then the KV cache
        assert not engine.sleeping
    assert torch.equal(engine.generate(ids, mask, n=1, greedy=True).responses, greedy.responses)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    engine.load_weights([[(n, p.detach()) for n, p in model.named_parameters()]])
    assert not torch.equal(engine.generate(ids, mask, n=1, greedy=True).responses, greedy.responses)
