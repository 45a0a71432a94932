"""Tensor-parallel numerical ops on the last pipeline stage (log-probs, entropy)."""

from megatron_gad.ops.logprobs import vocab_parallel_log_probs_and_entropy

__all__ = ["vocab_parallel_log_probs_and_entropy"]
