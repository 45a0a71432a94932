"""Token log-probs and entropy from vocab-parallel logits, under tensor parallelism.

The actor's last pipeline stage produces logits ``[B, S, V_pad / TP]``: each TP rank holds a
contiguous slice of the padded vocabulary (``V_pad`` = ``ModelArgs.padded_vocab``). The
functions here turn them into per-token quantities over the REAL vocabulary:

* the temperature divides the logits before the softmax (``z = logits / T``), as the rollout
  engine samples;
* columns with a global id ``>= vocab_size`` (vocab padding) are excluded: their probability
  is exactly 0 and they receive no gradient (a shard's padding columns are not computed at all;
  a shard of padding only holds its columns at ``finfo(float32).min``);
* all math is fp32, whatever the logits' dtype; three all-reduces over the TP group per call
  (max, sum of exp, and the target logit / ``sum e * z``, batched into one).

One fused autograd function computes both outputs and keeps a single ``[B, S, V_real / TP]``
fp32 tensor (the log-softmax over this shard's real columns) for the backward, which needs no communication. Called on the LAST
pipeline stage by every TP rank of that stage, in lockstep (collectives). Without Megatron's
parallel state (or with TP = 1) no collective is issued.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

_MASKED_LOGIT = torch.finfo(torch.float32).min  # exp() underflows to 0; 0 * it stays finite


def _tp_group() -> tuple[dist.ProcessGroup | None, int, int]:
    """(TP group or None, TP rank, TP size) from Megatron's parallel state, if initialised."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        return None, 0, 1
    if not ps.model_parallel_is_initialized():
        return None, 0, 1
    size = ps.get_tensor_model_parallel_world_size()
    if size == 1:
        return None, 0, 1
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), size


def _all_reduce(t: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


class _LogProbEntropy(torch.autograd.Function):
    """Fused vocab-parallel log-prob of ``labels`` and entropy; see the module docstring."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float, vocab_size: int) -> tuple[Tensor, Tensor]:
        group, rank, _ = _tp_group()
        local_vocab = logits.shape[-1]
        start = rank * local_vocab
        n_real = min(max(vocab_size - start, 0), local_vocab)
        width = n_real if n_real > 0 else local_vocab  # the columns computed on this rank
        # a fresh tensor: every in-place op below is safe. The padding columns of a shard that
        # holds real ones are left out (their probability is exactly 0); a shard of padding
        # only keeps its columns at the masked logit, so the collectives see every rank alike.
        z = logits[..., :width].float() / temperature
        if n_real == 0:
            z.fill_(_MASKED_LOGIT)
        z_max = _all_reduce(z.max(dim=-1).values, dist.ReduceOp.MAX, group)
        z -= z_max.unsqueeze(-1)
        exp = torch.exp(z)
        local = labels - start
        in_shard = (local >= 0) & (local < local_vocab)
        target = z.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
        target = torch.where(in_shard, target, torch.zeros_like(target))
        sums = torch.stack([exp.sum(-1), (exp * z).sum(-1), target])
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        sum_exp, sum_ez, target = sums[0], sums[1], sums[2]
        log_sum = torch.log(sum_exp)
        log_prob = target - log_sum
        entropy = log_sum - sum_ez / sum_exp
        z -= log_sum.unsqueeze(-1)  # z is now the (local slice of the) log-softmax
        ctx.save_for_backward(z, local, in_shard, entropy)
        ctx.temperature = temperature
        ctx.n_real = n_real
        ctx.local_vocab = local_vocab
        ctx.logits_dtype = logits.dtype
        return log_prob, entropy

    @staticmethod
    def backward(ctx, grad_log_prob: Tensor | None, grad_entropy: Tensor | None):
        log_softmax, local, in_shard, entropy = ctx.saved_tensors
        probs = torch.exp(log_softmax)
        # d logp_y / dz_j = 1[j = y] - p_j;  d H / dz_j = -p_j (log p_j + H)
        coeff = torch.zeros_like(entropy)
        if grad_log_prob is not None:
            coeff = coeff + grad_log_prob.float()
        if grad_entropy is not None:
            scale = grad_entropy.float().unsqueeze(-1)
            grad = -probs * (coeff.unsqueeze(-1) + scale * (log_softmax + entropy.unsqueeze(-1)))
        else:
            grad = -probs * coeff.unsqueeze(-1)
        if grad_log_prob is not None:
            onehot_val = torch.where(in_shard, grad_log_prob.float(), torch.zeros_like(coeff))
            grad.scatter_add_(-1, local.clamp(0, grad.shape[-1] - 1).unsqueeze(-1), onehot_val.unsqueeze(-1))
        grad = grad / ctx.temperature
        if ctx.n_real == 0:
            grad.zero_()  # padding only: p = 0, but 0 * (huge log p) may be nan
        elif ctx.n_real < ctx.local_vocab:  # the padding columns left out of the forward get 0
            grad = torch.nn.functional.pad(grad, (0, ctx.local_vocab - ctx.n_real))
        return grad.to(ctx.logits_dtype), None, None, None


def _check(logits: Tensor, temperature: float, vocab_size: int | None) -> int:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _, _, tp = _tp_group()
    padded = logits.shape[-1] * tp
    vocab = padded if vocab_size is None else int(vocab_size)
    if not 0 < vocab <= padded:
        raise ValueError(f"vocab_size={vocab} must lie in [1, padded vocab {padded}]")
    return vocab


def vocab_parallel_log_probs_and_entropy(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(log p(labels), entropy)``, both fp32 ``[B, S]``, from logits ``[B, S, V_pad / TP]``.

    ``labels`` ``[B, S]`` holds global token ids (< ``vocab_size``). ``vocab_size`` is the real
    vocabulary (None: no padding). Differentiable in ``logits`` through both outputs.
    Ranks: every TP rank of the last pipeline stage.
    """
    vocab = _check(logits, temperature, vocab_size)
    return _LogProbEntropy.apply(logits, labels, float(temperature), vocab)
