"""CPU rollout engine: greedy output equals transformers' own generate, sampling options behave,
and rollout log-probs agree with the Megatron actor before and after an optimizer step + sync."""

from __future__ import annotations

import pytest
import torch

from megatron_gad.rollout.base import RolloutConfig, TokenSpec
from megatron_gad.rollout.cpu_engine import CPURolloutEngine, filter_logits
from megatron_gad.runtime.spawn import run_distributed

VOCAB, PAD, EOS = 200, 0, 3


def hf_config(arch: str = "llama", tied: bool = True, std: float = 0.3):
    """A small GQA model; a large init std keeps random greedy decoding from collapsing to one token."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    return cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=1e-6,
        initializer_range=std, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1, **extra,
    )


def prompts(batch: int = 3, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts [B, P]: row 0 has 3 pad tokens, row 1 has 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in ((0, 3), (1, 1)):
        mask[row, :pad] = 0
        ids[row, :pad] = PAD
    return ids, mask


def engine_from(model, cfg: RolloutConfig, eos: int = EOS) -> CPURolloutEngine:
    engine = CPURolloutEngine(cfg, model.config, TokenSpec(PAD, (eos,)))
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    engine.load_weights([named[: len(named) // 2], named[len(named) // 2:]])  # two buckets
    return engine


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("qwen3", False)])
def test_greedy_equals_transformers_generate(arch: str, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(arch, tied), dtype=torch.float32).eval()
    ids, mask = prompts()
    limit = 10
    # Pick as EOS a token that greedy decoding of row 0 emits mid-way, so stopping is exercised.
    free = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=limit,
                          pad_token_id=PAD, eos_token_id=None)[:, ids.shape[1]:]
    eos = int(free[0, 4])
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=limit,
                         pad_token_id=PAD, eos_token_id=eos)[:, ids.shape[1]:]
    out = engine_from(model, RolloutConfig(response_length=limit), eos=eos).generate(ids, mask, n=2, greedy=True)
    expected = ref.repeat_interleave(2, dim=0)
    assert torch.equal(out.responses, expected[:, : out.responses.shape[1]])
    assert (expected[:, out.responses.shape[1]:] == PAD).all()
    assert len(set(free[0].tolist())) > 2, "greedy output is degenerate: the test would be weak"
    stop_len = int((free[0] == eos).int().argmax()) + 1
    assert out.response_mask[0].sum() == stop_len and out.responses[0, stop_len - 1] == eos  # stopped at EOS
    assert (out.responses[0, stop_len:] == PAD).all() and (out.rollout_log_probs[0, stop_len:] == 0).all()


def test_sampling_is_seeded_ordered_and_logprobs_are_of_processed_distribution() -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(hf_config(), dtype=torch.float32).eval()
    ids, mask = prompts()
    engine = engine_from(model, RolloutConfig(response_length=8, temperature=0.7, n=3))
    a, b, c = (engine.generate(ids, mask, seed=s) for s in (5, 5, 6))
    assert a.responses.shape[0] == 9 and torch.equal(a.responses, b.responses)
    assert torch.equal(a.rollout_log_probs, b.rollout_log_probs) and not torch.equal(a.responses, c.responses)
    assert ((a.rollout_log_probs < 0) | (a.response_mask == 0)).all()
    # decoded under inference_mode, returned as plain tensors (the trainer builds training inputs of them)
    assert not any(t.is_inference() for t in (a.responses, a.response_mask, a.rollout_log_probs))
    # top_k = 1 is greedy: the same tokens, each with probability 1 under the processed distribution.
    greedy = engine.generate(ids, mask, n=1, greedy=True)
    topk1 = engine_from(model, RolloutConfig(response_length=8, temperature=0.7, top_k=1)).generate(ids, mask, n=1)
    assert torch.equal(topk1.responses, greedy.responses)
    assert topk1.rollout_log_probs.abs().max() < 1e-6
    # Row order: prompt0 x n, prompt1 x n: the greedy rows of one prompt are identical.
    rep = engine.generate(ids, mask, n=2, greedy=True)
    assert torch.equal(rep.responses[0::2], greedy.responses) and torch.equal(rep.responses[1::2], greedy.responses)


def test_filter_logits_matches_a_bruteforce_nucleus() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 30, generator=g, dtype=torch.float64)
    for top_k, top_p in ((5, 1.0), (-1, 0.7), (8, 0.5), (-1, 1e-9)):
        got = filter_logits(logits, top_k, top_p)
        for row in range(logits.shape[0]):
            order = logits[row].argsort(descending=True).tolist()
            keep = order[:top_k] if top_k > 0 else order
            probs = logits[row, keep].softmax(-1)
            nucleus, mass = [], 0.0
            for tok, p in zip(keep, probs.tolist()):
                if mass >= top_p:
                    break
                nucleus.append(tok)
                mass += p
            assert set(torch.isfinite(got[row]).nonzero().flatten().tolist()) == set(nucleus)


def megatron_logprobs(chunks, ids: torch.Tensor, mask: torch.Tensor, resp: torch.Tensor, temperature: float, vocab: int):
    """Megatron actor (TP1/PP1) log-probs of ``resp`` tokens after left-padded prompts: [N, R]."""
    from megatron_gad.models.inputs import attention_mask_4d, position_ids_from_mask

    full = torch.cat([ids, resp.responses], 1)
    full_mask = torch.cat([mask, resp.response_mask], 1)
    with torch.no_grad():
        logits = chunks[0](input_ids=full, position_ids=position_ids_from_mask(full_mask),
                           attention_mask=attention_mask_4d(full_mask))
    prompt_len, width = ids.shape[1], resp.responses.shape[1]
    step_logits = logits[:, prompt_len - 1: prompt_len - 1 + width, :vocab].float() / temperature
    logp = torch.log_softmax(step_logits, -1).gather(-1, resp.responses[..., None]).squeeze(-1)
    return logp * resp.response_mask, step_logits.argmax(-1)


def max_abs_diff(rollout: torch.Tensor, megatron: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |rollout - Megatron| log-prob over the valid response tokens ([B, R] each)."""
    assert rollout.shape == megatron.shape == mask.shape
    return float((rollout.double() - megatron.double()).abs()[mask.bool()].max())


def sync_and_step(arch: str, tied: bool) -> dict:
    """One rank (TP1): Megatron actor -> export -> CPU engine; sample, compare; step; sync; compare."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.build import OptimConfig, build_model, build_optimizer
    from megatron_gad.models.inputs import attention_mask_4d, position_ids_from_mask
    from megatron_gad.rollout.weight_export import WeightExporter, sync_weights

    hf = hf_config(arch, tied)
    cfg = transformer_config_from_hf(hf)
    chunks = build_model(lambda pre, post: build_actor(cfg, model_args_from_hf(hf), pre, post), cfg)
    optimizer = build_optimizer(chunks, OptimConfig(lr=2e-2, clip_grad=1.0), cfg)
    exporter = WeightExporter(chunks, hf, dtype=torch.float32, bucket_bytes=16 * 1024)
    engine = CPURolloutEngine(RolloutConfig(response_length=8, temperature=0.8, n=2), hf, TokenSpec(PAD, (EOS,)))
    ids, mask = prompts(batch=4, length=6)
    out: dict = {}
    for phase in ("before", "after"):
        stats = sync_weights(exporter, engine)
        sampled = engine.generate(ids, mask, seed=3)
        rep_ids, rep_mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
        meg, _ = megatron_logprobs(chunks, rep_ids, rep_mask, sampled, 0.8, VOCAB)
        greedy = engine.generate(ids, mask, n=1, greedy=True)
        meg_greedy, argmax = megatron_logprobs(chunks, ids, mask, greedy, 1.0, VOCAB)
        megatron_storage = {p.untyped_storage().data_ptr() for p in chunks[0].parameters()}
        shared = {n for n, p in engine.model.named_parameters() if p.untyped_storage().data_ptr() in megatron_storage}
        out[phase] = {
            "shared": shared, "hf_names": {n for n, _ in engine.model.named_parameters()},
            "sampled": max_abs_diff(sampled.rollout_log_probs, meg, sampled.response_mask),
            "greedy": max_abs_diff(greedy.rollout_log_probs, meg_greedy, greedy.response_mask),
            "argmax_match": bool(((argmax == greedy.responses) | (greedy.response_mask == 0)).all()),
            "greedy_tokens": greedy.responses, "num_buckets": stats.num_buckets,
        }
        if phase == "before":  # one optimizer step on a random linear loss over the logits
            weights = torch.randn(4, 14, 256, generator=torch.Generator().manual_seed(0))
            batch = torch.cat([ids, greedy.responses[:, :8].new_full((4, 8), 5)], 1)

            def forward_step(data_iterator, model):
                m_ids = next(data_iterator)
                m_mask = torch.ones_like(m_ids)
                logits = model(input_ids=m_ids, position_ids=position_ids_from_mask(m_mask),
                               attention_mask=attention_mask_4d(m_mask))
                return logits, lambda o: ((o * weights).sum(), {})

            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks,
                                        num_microbatches=1, seq_length=14, micro_batch_size=4, forward_only=False)
            optimizer.step()
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_rollout_logprobs_agree_with_megatron_before_and_after_a_step(arch: str, tied: bool) -> None:
    res = run_distributed(sync_and_step, 1, args=(arch, tied))[0]
    for phase in ("before", "after"):
        r = res[phase]
        print(arch, phase, r["sampled"], r["greedy"])
        assert r["num_buckets"] > 1, "the sync should stream several buckets"
        assert r["sampled"] < 1e-4, f"{phase}: {r['sampled']}"
        assert r["greedy"] < 1e-4, f"{phase}: {r['greedy']}"
        assert r["argmax_match"], f"{phase}: greedy tokens are not the Megatron argmax"
        # TP=1, fp32 both sides: the engine reads the live Megatron parameters; only the q/k/v
        # split of the fused QKV (and its bias) is a copy
        copied = {n for n in r["hf_names"] if any(f"self_attn.{x}_proj." in n for x in "qkv")}
        assert r["shared"] == r["hf_names"] - copied, f"{phase}: {sorted(r['hf_names'] - copied - r['shared'])}"
    assert not torch.equal(res["before"]["greedy_tokens"], res["after"]["greedy_tokens"]), \
        "the optimizer step + sync did not change the engine's greedy output"


def test_a_diverged_model_is_refused_not_sampled() -> None:
    """inf/NaN logits (a diverged policy) raise ModelDivergedError instead of failing deep inside
    sampling or, worse, producing tokens."""
    from transformers import AutoModelForCausalLM

    from megatron_gad.rollout.base import ModelDivergedError

    model = AutoModelForCausalLM.from_config(hf_config(), dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    engine = engine_from(model, RolloutConfig(n=2, response_length=4))
    ids, mask = prompts()
    for greedy in (True, False):
        with pytest.raises(ModelDivergedError, match="inf/NaN logits"):
            engine.generate(ids, mask, greedy=greedy)
