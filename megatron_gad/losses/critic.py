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


def discriminator_accuracy(teacher_scores: Tensor, student_scores: Tensor) -> Tensor:
    """Share of pairs ``[B]`` where the teacher outscores the student (ties count as wrong), 0-dim."""
    _check_pair(teacher_scores, student_scores)
    return (teacher_scores > student_scores).float().mean().detach()


def value_loss(vpreds: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor,
               cliprange_value: float, loss_agg_mode: str,
               normalizer: Normalizer = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss over response tokens; all inputs ``[B, T]``.

    Per token 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2), aggregated by
    ``agg_loss(..., loss_agg_mode, normalizer)`` (see its normaliser contract). Metrics
    (detached 0-dim, over the local valid tokens): ``vf_clipfrac`` (share of tokens where the
    clipped term is strictly larger) and ``vpred_mean``.
    """
    mask = response_mask.to(vpreds.dtype)
    clipped_v = old_values + (vpreds - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_sq = (vpreds - returns).square()
    clipped_sq = (clipped_v - returns).square()
    loss_mat = 0.5 * torch.maximum(unclipped_sq, clipped_sq)
    loss = agg_loss(loss_mat, mask, loss_agg_mode, normalizer)
    metrics = {
        "vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).to(mask.dtype), mask).detach(),
        "vpred_mean": masked_mean(vpreds, mask).detach(),
    }
    return loss, metrics
