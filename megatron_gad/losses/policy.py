"""Policy-side losses: aggregation modes, PPO / GSPO / GSPO-token objectives, KL penalties.

Pure torch, no Megatron import. Every ``[B, T]`` tensor is laid out over the *response* tokens
of ``B`` sequences (right-padded or with holes; ``mask`` marks the valid ones, 0/1 float or bool).

Aggregation and the ``normalizer`` contract
-------------------------------------------
``agg_loss`` divides a masked *sum* by a denominator. Left alone (``normalizer=None``) the
denominator is the LOCAL count of the tensor it is given:

* ``token-mean``: number of valid tokens;
* ``seq-mean-token-mean`` / ``seq-mean-token-sum``: number of NON-EMPTY sequences (rows with at
  least one valid token). A row with zero valid tokens contributes 0 to the sum and is not
  counted, so padding rows never dilute the loss and never produce NaN.

A caller that splits one mini-batch over micro-batches and/or data-parallel ranks passes the
GLOBAL count instead (the sum over all pieces of ``agg_normalizer(mask, mode)``); then the sum of
the per-piece losses equals the loss of the unsplit mini-batch, and so do the gradients. Any
denominator (local or given) is clamped to at least 1, so an all-empty batch gives 0, not NaN.

Metrics returned next to a loss are detached 0-dim tensors averaged over the LOCAL piece; they
are for logging only and never synchronise the device (no ``.item()``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

LOSS_AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
POLICY_LOSS_MODES: tuple[str, ...] = ("ppo", "gspo", "gspo_token")
KL_KINDS: tuple[str, ...] = ("kl", "abs", "mse", "low_var_kl")

_PPO_LOG_RATIO_CLAMP = 20.0  # keeps exp() finite for wildly off-policy tokens
_GSPO_LOG_RATIO_MAX = 10.0  # the GSPO reference clamps the log sequence ratio at 10
_KL_DIFF_CLAMP = 20.0
_LOW_VAR_KL_CLAMP = 10.0

Normalizer = float | Tensor | None


def check_choice(what: str, value: str, valid: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``what``, the bad ``value`` and the ``valid`` names."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid values: {', '.join(valid)}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set (any matching shape).

    Returns a 0-dim tensor; with no valid position it returns 0 (the count is clamped to 1).
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def agg_normalizer(mask: Tensor, loss_agg_mode: str) -> Tensor:
    """The local denominator ``agg_loss`` uses for ``mask`` ``[B, T]`` under ``loss_agg_mode``.

    ``token-mean``: number of valid tokens; ``seq-*`` modes: number of rows with at least one
    valid token. Returned unclamped as a 0-dim float tensor, so callers can sum it over
    micro-batches and all-reduce it over data-parallel ranks, then pass it as ``normalizer``.
    """
    check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    mask = mask.float()
    if loss_agg_mode == "token-mean":
        return mask.sum()
    return (mask.sum(dim=-1) > 0).float().sum()


def _denominator(local: Tensor, normalizer: Normalizer, like: Tensor) -> Tensor:
    if normalizer is None:
        count = local
    else:
        if not isinstance(normalizer, Tensor) and normalizer < 0:
            raise ValueError(f"normalizer must be a non-negative count, got {normalizer!r}")
        count = torch.as_tensor(normalizer, dtype=like.dtype, device=like.device)
    return count.to(like.dtype).clamp(min=1.0)


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str, normalizer: Normalizer = None) -> Tensor:
    """Aggregate a per-token loss ``loss_mat`` ``[B, T]`` over ``mask`` ``[B, T]`` to a 0-dim loss.

    * ``token-mean``: sum over valid tokens / token count;
    * ``seq-mean-token-mean``: per-row mean over its valid tokens, then sum over rows / row count;
    * ``seq-mean-token-sum``: per-row sum over its valid tokens, then sum over rows / row count.

    Rows with no valid token contribute 0 and are not counted. ``normalizer`` (float or tensor)
    replaces the local count: pass the GLOBAL token count (token-mean) or global number of
    non-empty rows (seq-* modes) of the whole mini-batch, see ``agg_normalizer`` and the module
    docstring; summing the per-piece results then reproduces the unsplit loss exactly.
    """
    check_choice("loss_agg_mode", mode, LOSS_AGG_MODES)
    mask = mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    if mode == "token-mean":
        numerator = masked.sum()
    else:
        per_seq = masked.sum(dim=-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / mask.sum(dim=-1).clamp(min=1.0)
        numerator = per_seq.sum()
    local = agg_normalizer(mask, mode)
    return numerator / _denominator(local, normalizer, loss_mat)


def entropy_loss(entropy: Tensor, mask: Tensor, loss_agg_mode: str,
                 normalizer: Normalizer = None) -> Tensor:
    """Aggregate per-token ``entropy`` ``[B, T]`` exactly like ``agg_loss`` (same modes/normaliser)."""
    return agg_loss(entropy, mask, loss_agg_mode, normalizer)


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate between the policy and a reference model, shape of ``log_prob``.

    ``kl``: logp - ref; ``abs``: |logp - ref|; ``mse``: 0.5 (logp - ref)^2;
    ``low_var_kl`` (Schulman's k3): exp(ref - logp) - (ref - logp) - 1, with ref - logp clamped to
    [-20, 20] before exp (keeps the backward free of inf * 0) and the result clamped to [-10, 10].
    """
    check_choice("kl kind", kind, KL_KINDS)
    diff = log_prob - ref_log_prob
    if kind == "kl":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    rev = (-diff).clamp(-_KL_DIFF_CLAMP, _KL_DIFF_CLAMP)
    return (torch.exp(rev) - rev - 1.0).clamp(-_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)


def _seq_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean over valid tokens of logp - old_logp, ``[B]`` (0 for an empty row)."""
    return ((log_prob - old_log_prob) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _clipped_pg(ratio: Tensor, adv: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Pessimistic clipped surrogate max(-A r, -A clip(r)) and where the clip decided it: the
    ratio lies outside ``[1 - low, 1 + high]`` (the clip is active) and the clipped term is the
    larger one."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    active = (ratio < 1.0 - low) | (ratio > 1.0 + high)
    return torch.maximum(unclipped, clipped), active & (clipped > unclipped)


def _ppo(log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, mask: Tensor, low: float,
         high: float, clip_ratio_c: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Vanilla PPO per-token loss ``[B, T]``, clipped-token flags and dual-clip flags."""
    log_ratio = (log_prob - old_log_prob).clamp(-_PPO_LOG_RATIO_CLAMP, _PPO_LOG_RATIO_CLAMP)
    loss_mat, clipped = _clipped_pg(torch.exp(log_ratio), adv, low, high)
    lower = torch.zeros_like(clipped)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1.0 for dual clip, got {clip_ratio_c}")
        cap = -adv * clip_ratio_c
        negative = adv < 0
        lower = negative & (loss_mat > cap)
        loss_mat = torch.where(negative, torch.minimum(loss_mat, cap), loss_mat)
    return loss_mat, clipped, lower


def _gspo(log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, mask: Tensor, low: float,
          high: float) -> tuple[Tensor, Tensor]:
    """GSPO sequence-level loss broadcast to tokens ``[B, T]`` and per-row clipped flags ``[B]``.

    s_i = exp(mean_t(logp - old_logp)) (log clamped at 10), A_i = mean of the row's advantages;
    row loss max(-A_i s_i, -A_i clip(s_i)) is placed on each of the row's tokens so that
    ``seq-mean-token-mean`` aggregation returns mean_i of the row losses.
    """
    seq_log_ratio = _seq_log_ratio(log_prob, old_log_prob, mask).clamp(max=_GSPO_LOG_RATIO_MAX)
    seq_adv = (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    seq_loss, clipped = _clipped_pg(torch.exp(seq_log_ratio), seq_adv, low, high)
    return seq_loss.unsqueeze(-1).expand_as(log_prob), clipped


def _gspo_token(log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, mask: Tensor, low: float,
                high: float) -> tuple[Tensor, Tensor]:
    """GSPO-token per-token loss ``[B, T]`` and clipped-token flags.

    log s_it = logp_t - sg(logp_t) + sg(mean_t(logp - old_logp)), clamped at 10: its value is
    the sequence ratio, its gradient that of logp_t scaled by s_i.
    """
    seq_log_ratio = _seq_log_ratio(log_prob, old_log_prob, mask).detach()
    log_ratio = log_prob - log_prob.detach() + seq_log_ratio.unsqueeze(-1)
    ratio = torch.exp(log_ratio.clamp(max=_GSPO_LOG_RATIO_MAX))
    return _clipped_pg(ratio, adv, low, high)


def policy_loss(mode: str, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                response_mask: Tensor, clip_ratio_low: float, clip_ratio_high: float,
                loss_agg_mode: str, *, clip_ratio_c: float | None = None,
                normalizer: Normalizer = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss over response tokens; all inputs ``[B, T]``.

    Modes: ``ppo`` (token ratio exp(logp - old_logp), log clamped to +-20, clip to
    [1 - low, 1 + high], optional dual clip ``clip_ratio_c`` > 1 for negative advantages),
    ``gspo`` (sequence ratio, one clip decision per sequence, row advantage = mean of the row's
    token advantages) and ``gspo_token`` (token-form GSPO; same loss and gradient as ``gspo``
    when advantages are constant per sequence). ``clip_ratio_c`` is ignored by the GSPO modes.

    GSPO aggregation: use ``seq-mean-token-mean`` (the paper's mean over sequences).
    ``token-mean`` is accepted (length-weighted mean of sequence losses); ``seq-mean-token-sum``
    raises ``ValueError`` for both GSPO modes, since it multiplies each sequence loss by its length
    (the known "exploding GSPO loss" bug).

    Returns ``(loss, metrics)``: loss is 0-dim, aggregated by ``agg_loss`` with ``normalizer``;
    metrics (detached 0-dim): ``pg_clipped`` / ``pg_clip_units`` (int64 counts: valid tokens, or
    non-empty sequences for ``gspo``, where the clip was active and the clipped term the larger;
    and the number of such units), ``pg_clipfrac`` (their ratio), ``pg_clipped_lower`` (int64
    count of valid tokens capped by the dual clip; 0 without it) and ``pg_clipfrac_lower`` (that
    count over the valid tokens), ``ppo_kl`` (mean of old_logp - logp over valid tokens). The
    counts are exact, so they sum over micro-batches and ranks without rounding.
    """
    check_choice("policy loss mode", mode, POLICY_LOSS_MODES)
    check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    if mode != "ppo" and loss_agg_mode == "seq-mean-token-sum":
        raise ValueError(f"policy loss mode {mode!r} must not use loss_agg_mode "
                         "'seq-mean-token-sum' (it scales each sequence loss by its length); "
                         "use 'seq-mean-token-mean'")
    mask = response_mask.to(log_prob.dtype)
    advantages = advantages.to(log_prob.dtype)
    lower = torch.zeros_like(mask)
    valid = mask > 0
    if mode == "ppo":
        loss_mat, clipped, lower = _ppo(log_prob, old_log_prob, advantages, mask, clip_ratio_low,
                                        clip_ratio_high, clip_ratio_c)
        units = valid
    elif mode == "gspo":
        loss_mat, clipped = _gspo(log_prob, old_log_prob, advantages, mask, clip_ratio_low,
                                  clip_ratio_high)
        units = valid.any(-1)
    else:
        loss_mat, clipped = _gspo_token(log_prob, old_log_prob, advantages, mask, clip_ratio_low,
                                        clip_ratio_high)
        units = valid
    loss = agg_loss(loss_mat, mask, loss_agg_mode, normalizer)
    clipped_count, unit_count = (clipped.bool() & units).sum(), units.sum()
    lower_count, token_count = (lower.bool() & valid).sum(), valid.sum()
    metrics = {
        "pg_clipped": clipped_count.detach(),
        "pg_clip_units": unit_count.detach(),
        "pg_clipfrac": (clipped_count.to(mask.dtype) / unit_count.clamp(min=1)).detach(),
        "pg_clipped_lower": lower_count.detach(),
        "pg_clipfrac_lower": (lower_count.to(mask.dtype) / token_count.clamp(min=1)).detach(),
        "ppo_kl": masked_mean(old_log_prob - log_prob, mask).detach(),
    }
    return loss, metrics
