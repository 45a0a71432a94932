"""Metrics and small collectives of the engines: reduced once per mini-batch, same on every rank.

All functions are called by every rank in lockstep (collectives over the DP / PP groups).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_gad.runtime.distributed import device


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def global_count(local: Tensor) -> Tensor:
    """Sum a count over the data-parallel group (fp32 0-dim tensor on this device)."""
    total = local.detach().float().to(device()).clone()
    if _ps().get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=_ps().get_data_parallel_group())
    return total


def broadcast_from_last_stage(tensor: Tensor) -> Tensor:
    """Return the last pipeline stage's ``tensor`` on every stage (same shape/dtype everywhere).

    Non-last stages pass a placeholder of the right shape. No-op at PP = 1.
    """
    ps = _ps()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    return tensor


class MetricAccumulator:
    """Accumulates metric tensors over the micro-batches of one mini-batch, no host sync.

    ``add_sum(name, v)``: the result is the total of ``v`` over micro-batches and DP ranks (for
    loss shares computed with the global normaliser). ``add_mean(name, mean, weight)``: the
    result is the ``weight``-weighted mean over micro-batches and DP ranks. ``add_count(name,
    hits, total)``: the result is ``sum(hits) / sum(total)`` of integer counts, summed as int64
    over micro-batches and DP ranks, so a count-based metric (a clip fraction, an accuracy) is the
    same exact ratio however the rows are split. :meth:`reduce` is the one synchronisation point:
    one DP all-reduce per dtype (last stage) and one PP broadcast per dtype.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = list(names)
        self._num = {n: torch.zeros((), device=device()) for n in self.names}
        self._den: dict[str, Tensor | None] = {n: None for n in self.names}
        self._counts: dict[str, Tensor] = {}

    def add_sum(self, name: str, value: Tensor) -> None:
        """Add a share of a global total (last stage only)."""
        self._num[name] = self._num[name] + value.detach().float()

    def add_mean(self, name: str, mean: Tensor, weight: Tensor) -> None:
        """Add a local mean with its weight (count of tokens or sequences; last stage only)."""
        weight = weight.detach().float()
        self._num[name] = self._num[name] + mean.detach().float() * weight
        den = self._den[name]
        self._den[name] = weight if den is None else den + weight

    def add_count(self, name: str, hits: Tensor | int, total: Tensor | int) -> None:
        """Add integer ``hits`` out of ``total`` (last stage only); see the class docstring."""
        if name not in self._num:
            raise KeyError(f"metric {name!r} is not one of {self.names}")
        pair = torch.stack([torch.as_tensor(hits, device=device()).detach().long().reshape(()),
                            torch.as_tensor(total, device=device()).detach().long().reshape(())])
        self._counts[name] = pair if name not in self._counts else self._counts[name] + pair

    def reduce(self) -> dict[str, float]:
        """All ranks: the mini-batch metrics as floats, identical on every rank."""
        ps = _ps()
        n = len(self.names)
        packed = torch.zeros(2 * n, device=device())
        counts = torch.zeros(2 * n, dtype=torch.long, device=device())
        if ps.is_pipeline_last_stage():
            for i, name in enumerate(self.names):
                packed[i] = self._num[name]
                den = self._den[name]
                packed[n + i] = -1.0 if den is None else den
                if name in self._counts:
                    counts[i], counts[n + i] = self._counts[name][0], self._counts[name][1]
            if ps.get_data_parallel_world_size() > 1:
                is_mean = packed[n:] >= 0
                dist.all_reduce(packed, group=ps.get_data_parallel_group())
                dist.all_reduce(counts, group=ps.get_data_parallel_group())
                packed[n:] = torch.where(is_mean, packed[n:], torch.full_like(packed[n:], -1.0))
        packed = broadcast_from_last_stage(packed).tolist()
        is_count = [name in self._counts for name in self.names]
        if ps.get_pipeline_model_parallel_world_size() > 1:
            # Which metrics are counts is known on the last stage only; it travels with the counts.
            flags = torch.tensor(is_count, dtype=torch.long, device=device())
            counts = broadcast_from_last_stage(torch.cat([counts, flags]))
            counts, is_count = counts[:2 * n], [bool(f) for f in counts[2 * n:].tolist()]
        counts = counts.tolist()
        result = {}
        for i, name in enumerate(self.names):
            if is_count[i]:
                result[name] = counts[i] / counts[n + i] if counts[n + i] > 0 else 0.0
            elif packed[n + i] < 0:
                result[name] = packed[i]
            else:
                result[name] = packed[i] / max(packed[n + i], 1e-12)
        return result


def mean_metrics(per_mini_batch: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over mini-batches (and epochs)."""
    keys = per_mini_batch[0].keys() if per_mini_batch else ()
    return {k: sum(m[k] for m in per_mini_batch) / len(per_mini_batch) for k in keys}
