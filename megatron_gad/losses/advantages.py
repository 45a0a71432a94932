"""Advantage estimators: GRPO (group-relative, outcome scores) and GAE (value critic).

Pure torch, no Megatron import. Both run under ``torch.no_grad()``: advantages and returns are
targets, never differentiated through. Each data-parallel rank computes them for its own rows:
GRPO groups never span ranks (a prompt's n responses stay together), and GAE's whitening takes a
``reduce`` that sums its statistics over the ranks, so both equal a whole-batch computation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


@torch.no_grad()
def grpo_advantages(scores: Tensor, group_index: Tensor, norm_by_std: bool = True,
                    eps: float = 1e-6) -> Tensor:
    """Group-normalised advantages ``[B]`` from per-response scalar ``scores`` ``[B]``.

    ``group_index`` ``[B]`` (int64) names the prompt of each response; ids may be arbitrary,
    unsorted and non-contiguous. A_i = (s_i - mean_g) / (std_g + eps) with the unbiased std of the
    group, or s_i - mean_g when ``norm_by_std`` is False. A group of one response gets 0.
    Vectorised with ``index_add_`` (no Python loop over groups). Broadcast the result over the
    response tokens with ``adv[:, None] * response_mask``.
    """
    if scores.dim() != 1 or group_index.shape != scores.shape:
        raise ValueError(f"scores and group_index must both be [B]; got {tuple(scores.shape)} "
                         f"and {tuple(group_index.shape)}")
    values = scores.to(torch.float64)
    groups, inverse = torch.unique(group_index, return_inverse=True)
    zeros = values.new_zeros(groups.numel())
    counts = zeros.index_add(0, inverse, torch.ones_like(values))
    means = zeros.index_add(0, inverse, values) / counts
    centred = values - means[inverse]
    if norm_by_std:
        sq = zeros.index_add(0, inverse, centred.square())
        std = (sq / (counts - 1.0).clamp(min=1.0)).sqrt()
        centred = centred / (std[inverse] + eps)
    singleton = counts[inverse] < 2
    return centred.masked_fill(singleton, 0.0).to(scores.dtype)


#: Sums a small statistics tensor over the ranks that share a batch (e.g. the data-parallel
#: group) and returns it; None means this process holds the whole batch.
StatsReduce = Callable[[Tensor], Tensor]


@torch.no_grad()
def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8, reduce: StatsReduce | None = None) -> Tensor:
    """Shift ``values`` ``[B, T]`` to mean 0 and scale to unit (unbiased) variance over ``mask``.

    Masked positions are returned as 0. With fewer than two valid tokens the variance is taken
    as 0 (the centred values are then 0 anyway). ``reduce`` sums the statistics over ranks that
    each hold part of the batch, so the result equals whitening the whole batch in one process.
    """
    reduce = reduce or (lambda t: t)
    mask = mask.to(values.dtype)
    total, count = reduce(torch.stack([(values * mask).sum(), mask.sum()]).double()).to(values.dtype)
    mean = total / count.clamp(min=1.0)
    centred = (values - mean) * mask
    squares = reduce(centred.square().sum().double().reshape(1)).to(values.dtype)[0]
    var = squares / (count - 1.0).clamp(min=1.0)
    return centred * torch.rsqrt(var + eps)


@torch.no_grad()
def gae_advantages(token_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float,
                   lam: float, whiten: bool = True, reduce: StatsReduce | None = None) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens; all tensors ``[B, T]``.

    delta_t = r_t + gamma V_{t'} - V_t and A_t = delta_t + gamma lam A_{t'}, where t' is the NEXT
    VALID token of the row (V and A past the last valid token are 0). Masked positions are skipped
    entirely: whatever rewards/values they hold, nothing propagates through them, so right padding
    (and holes) are handled. Returns ``(advantages, returns)``: returns = un-whitened A + V; with
    ``whiten`` (the verl convention, default) advantages are then whitened over the valid tokens
    of the whole batch by ``masked_whiten`` (``reduce``: over every rank's part of the batch).
    Masked positions of both outputs are 0.
    """
    mask = response_mask.to(values.dtype)
    rewards = token_rewards.to(values.dtype)
    next_value = values.new_zeros(values.shape[0])
    running = values.new_zeros(values.shape[0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * running
        running = m * candidate + (1.0 - m) * running
        next_value = m * values[:, t] + (1.0 - m) * next_value
        advantages[:, t] = m * candidate
    returns = (advantages + values) * mask
    if whiten:
        advantages = masked_whiten(advantages, mask, reduce=reduce)
    return advantages, returns
