"""Critic losses: the GAD discriminator (Bradley-Terry) loss and the PPO clipped value loss.

Pure torch, no Megatron import. The discriminator scores are one scalar per response (read at
the last valid response token by the critic model); the value loss is per response token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_gad.losses.policy import Normalizer, agg_loss, masked_mean


def _check_pair(teacher_scores: Tensor, student_scores: Tensor) -> None:
    if teacher_scores.shape != student_scores.shape:
        raise ValueError("teacher_scores and student_scores must have the same shape [B]; got "
                         f"{tuple(teacher_scores.shape)} and {tuple(student_scores.shape)}")


def discriminator_loss(teacher_scores: Tensor, student_scores: Tensor) -> Tensor:
    """Bradley-Terry loss mean_i -log sigmoid(teacher_i - student_i), 0-dim.

    ``teacher_scores`` and ``student_scores`` are ``[B]``: pair i is a student response and the
    teacher response of the same prompt (the teacher score repeated over the prompt's n student
    responses). Uses ``F.logsigmoid``, finite for any score gap.
    """
    _check_pair(teacher_scores, student_scores)
    return -F.logsigmoid(teacher_scores - student_scores).mean()


def discriminator_half_points(teacher_scores: Tensor, student_scores: Tensor) -> Tensor:
    """Integer count ``2 * wins + ties`` over the pairs ``[B]`` (int64, 0-dim, detached).

    A pair is a win where the teacher scores strictly above the student and a tie where the two
    scores are equal; counting in half points keeps the accuracy an exact ratio of integers,
    ``half_points / (2 B)``, which sums over micro-batches and ranks without rounding.
    """
    _check_pair(teacher_scores, student_scores)
    wins = (teacher_scores > student_scores).sum()
    ties = (teacher_scores == student_scores).sum()
    return (2 * wins + ties).detach()


def discriminator_accuracy(teacher_scores: Tensor, student_scores: Tensor) -> Tensor:
    """Share of pairs ``[B]`` where the teacher outscores the student, ties counting one half
    (so an untrained discriminator that scores everything alike gives 0.5), fp32 0-dim."""
    points = discriminator_half_points(teacher_scores, student_scores)
    return (points.float() / (2 * max(teacher_scores.numel(), 1))).detach()


def value_loss(vpreds: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor,
               cliprange_value: float, loss_agg_mode: str,
               normalizer: Normalizer = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss over response tokens; all inputs ``[B, T]``.

    Per token 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2), aggregated by
    ``agg_loss(..., loss_agg_mode, normalizer)`` (see its normaliser contract). Metrics
    (detached 0-dim, over the local valid tokens): ``vf_clipped`` (int64 count of tokens where
    the clip is active, ``|v - v_old| > c``, and the clipped term is the larger), ``vf_clipfrac``
    (that count over the valid tokens) and ``vpred_mean``.

    Where the clip is inactive the two terms are equal in exact arithmetic, but
    ``v_old + (v - v_old)`` can round one ulp away from ``v``; comparing the squares alone would
    then count such a token as clipped or not by rounding noise, so the clip's activity is tested
    on ``|v - v_old|`` itself.
    """
    mask = response_mask.to(vpreds.dtype)
    clipped_v = old_values + (vpreds - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_sq = (vpreds - returns).square()
    clipped_sq = (clipped_v - returns).square()
    loss_mat = 0.5 * torch.maximum(unclipped_sq, clipped_sq)
    loss = agg_loss(loss_mat, mask, loss_agg_mode, normalizer)
    active = (vpreds - old_values).abs() > cliprange_value
    clipped = active & (clipped_sq > unclipped_sq) & (response_mask > 0)
    count = clipped.sum().detach()
    metrics = {
        "vf_clipped": count,
        "vf_clipfrac": (count.to(vpreds.dtype) / mask.sum().clamp(min=1.0)).detach(),
        "vpred_mean": masked_mean(vpreds, mask).detach(),
    }
    return loss, metrics
