"""Vocab-parallel log-probs and entropy equal a float64 full-vocab reference, at TP=1 and TP=2.

The logits carry vocab padding (real vocab 200, padded 256) whose columns hold LARGE values: if
the padding were not excluded, both the values and the gradients would be far off.
"""

from __future__ import annotations

import pytest
import torch

from megatron_gad.ops import vocab_parallel_log_probs_and_entropy
from megatron_gad.runtime.spawn import run_distributed

pytestmark = pytest.mark.timeout(120)

B, S, VOCAB, PADDED, TEMP = 3, 5, 200, 256, 0.7


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, S, PADDED, generator=g, dtype=torch.float64) * 3
    logits[..., VOCAB:] += 50.0  # padding columns that would dominate if not masked
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    w_lp = torch.randn(B, S, generator=g, dtype=torch.float64)
    w_ent = torch.randn(B, S, generator=g, dtype=torch.float64)
    return {"logits": logits, "labels": labels, "w_lp": w_lp, "w_ent": w_ent}


def reference(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64, full vocab, padding sliced away: (log_probs, entropy, grad of the weighted sum)."""
    logits = x["logits"].clone().requires_grad_(True)
    logp_all = torch.log_softmax(logits[..., :VOCAB] / TEMP, dim=-1)
    log_prob = logp_all.gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ((log_prob * x["w_lp"]).sum() + (entropy * x["w_ent"]).sum()).backward()
    return log_prob.detach(), entropy.detach(), logits.grad


def shard_run(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per rank: this TP rank's vocab slice (fp32) -> log-probs, entropy, gathered logits grad."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    shard = x["logits"].float().chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    log_prob, entropy = vocab_parallel_log_probs_and_entropy(shard, x["labels"], TEMP, VOCAB)
    ((log_prob * x["w_lp"].float()).sum() + (entropy * x["w_ent"].float()).sum()).backward()
    grads = [torch.empty_like(shard.grad) for _ in range(tp)]
    torch.distributed.all_gather(grads, shard.grad, group=ps.get_tensor_model_parallel_group())
    return log_prob.detach(), entropy.detach(), torch.cat(grads, dim=-1)


def check(got: tuple, ref: tuple, label: str) -> dict[str, float]:
    diffs = {}
    for name, g, r in zip(("log_prob", "entropy", "grad"), got, ref):
        diffs[name] = (g.double() - r).abs().max().item()
        assert diffs[name] < 2e-5, f"{label}: {name} max abs diff {diffs[name]:.2e}"
    assert got[2][..., VOCAB:].abs().max().item() == 0.0, f"{label}: padding columns got a gradient"
    return diffs


@pytest.mark.distributed
def test_tp2_and_tp1_equal_float64_reference() -> None:
    x = make_inputs()
    ref = reference(x)
    for tp in (1, 2):
        results = run_distributed(shard_run, tp, tp=tp, args=(x,), timeout_s=60)
        for rank, got in enumerate(results):
            check(got, ref, f"tp={tp} rank={rank}")


def test_single_process_without_parallel_state_and_bf16() -> None:
    """No Megatron state: no collective; bf16 logits are computed in fp32 and get a bf16 grad."""
    x = make_inputs()
    ref = reference(x)
    check(shard_run_local(x, torch.float32), ref, "local fp32")
    logits = x["logits"].to(torch.bfloat16).requires_grad_(True)
    log_prob, entropy = vocab_parallel_log_probs_and_entropy(logits, x["labels"], TEMP, VOCAB)
    assert log_prob.dtype == torch.float32 and entropy.dtype == torch.float32
    (log_prob.sum() + entropy.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16
    assert (log_prob.double() - ref[0]).abs().max() < 0.1  # bf16 input rounding only


def shard_run_local(x: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple:
    logits = x["logits"].to(dtype).requires_grad_(True)
    log_prob, entropy = vocab_parallel_log_probs_and_entropy(logits, x["labels"], TEMP, VOCAB)
    ((log_prob * x["w_lp"].to(dtype)).sum() + (entropy * x["w_ent"].to(dtype)).sum()).backward()
    return log_prob.detach(), entropy.detach(), logits.grad


def test_entropy_only_gradient_and_errors() -> None:
    """Entropy alone backpropagates (log-prob grad None); bad temperature / vocab raise."""
    x = make_inputs()
    logits = x["logits"].clone().requires_grad_(True)
    ref_logits = x["logits"].clone().requires_grad_(True)
    vocab_parallel_log_probs_and_entropy(logits.float(), x["labels"], TEMP, VOCAB)[1].sum().backward()
    logp_all = torch.log_softmax(ref_logits[..., :VOCAB] / TEMP, dim=-1)
    (-(logp_all.exp() * logp_all).sum(-1)).sum().backward()
    assert (logits.grad - ref_logits.grad).abs().max() < 2e-5
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_log_probs_and_entropy(x["logits"], x["labels"], 0.0, VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_log_probs_and_entropy(x["logits"], x["labels"], 1.0, PADDED + 1)
