"""One training step's experience: rollouts joined to their prompts, scores, advantages.

Pure tensor code shared by the trainer and its tests. Rows are ordered prompt 0 x n, prompt 1 x n,
... and ``group_index`` names each row's prompt, so GRPO normalises within the n responses of a
prompt. Sequences are ``[prompt (left-padded, P) | response (right-padded, R)]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_gad.engine.batch import SequenceBatch
from megatron_gad.losses import gae_advantages, grpo_advantages
from megatron_gad.losses.advantages import StatsReduce
from megatron_gad.models.critic import place_at_last_token

ADV_ESTIMATORS = ("grpo", "gae")


def join(prompt_ids: Tensor, prompt_mask: Tensor, responses: Tensor, response_mask: Tensor) -> SequenceBatch:
    """Join left-padded prompts ``[N, P]`` and right-padded responses ``[N, R]``.

    The attention mask covers valid prompt and response tokens; position ids count valid tokens,
    so a left-padded prompt starts at position 0 as in the rollout engine and in Hugging Face.
    """
    if prompt_ids.shape[0] != responses.shape[0]:
        raise ValueError(f"{prompt_ids.shape[0]} prompts but {responses.shape[0]} responses")
    response_mask = response_mask.to(prompt_mask.dtype)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return SequenceBatch.from_ids(input_ids, attention_mask, response_mask)


@dataclass
class Experience:
    """Everything one step learns from, aligned row by row (``N = prompts * n``)."""

    student: SequenceBatch
    group_index: Tensor  # [N] int64 prompt id
    teacher: SequenceBatch | None = None  # GAD: the prompt's teacher response, repeated per row
    rollout_log_probs: Tensor | None = None  # [N, R] from the rollout engine
    old_log_probs: Tensor | None = None  # [N, R] recomputed by the Megatron actor
    ref_log_probs: Tensor | None = None  # [N, R] reference policy (KL)
    scores: Tensor | None = None  # [N] discriminator scores or rewards of the student rows
    teacher_scores: Tensor | None = None  # [N] discriminator scores of the teacher rows (GAD)
    values: Tensor | None = None  # [N, R] value critic (GAE)
    advantages: Tensor | None = None  # [N, R]
    returns: Tensor | None = None  # [N, R] (GAE)


def compute_advantages(
    estimator: str,
    scores: Tensor,
    group_index: Tensor,
    response_mask: Tensor,
    *,
    values: Tensor | None = None,
    norm_by_std: bool = True,
    gamma: float = 1.0,
    lam: float = 0.95,
    token_penalty: Tensor | None = None,
    reduce: StatsReduce | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token advantages ``[N, R]`` (and returns for GAE) from sequence scores ``[N]``.

    ``grpo``: group-normalised scores broadcast over each row's valid response tokens.
    ``gae``: the score is the reward of the last valid response token; ``values`` ``[N, R]`` are
    required. ``token_penalty`` ``[N, R]`` (the in-reward KL penalty) is subtracted from the token
    rewards on valid tokens; GRPO then normalises each row's total reward. ``reduce`` sums GAE's
    whitening statistics over the data-parallel ranks. Raises ValueError for an unknown estimator
    or missing values.
    """
    mask = response_mask.to(scores.dtype)
    penalty = None if token_penalty is None else token_penalty.to(scores.dtype) * mask
    if estimator == "grpo":
        totals = scores if penalty is None else scores - penalty.sum(-1)
        adv = grpo_advantages(totals, group_index, norm_by_std=norm_by_std)
        return adv.unsqueeze(1) * mask, None
    if estimator == "gae":
        if values is None:
            raise ValueError("adv_estimator 'gae' needs critic values (a value critic)")
        rewards = place_at_last_token(scores, response_mask)
        if penalty is not None:
            rewards = rewards - penalty
        return gae_advantages(rewards, values, mask, gamma, lam, reduce=reduce)
    raise ValueError(f"adv_estimator {estimator!r} is not one of {', '.join(ADV_ESTIMATORS)}")


def teacher_forced_scores(group_index: Tensor, teacher_repeat: int) -> Tensor:
    """The teacher-forced diagnostic (``critic.teacher_repeat``): the j-th of the ``teacher_repeat`` copies of a prompt's teacher
    response scores ``j`` (0..k-1), a known ranking for exercising the GRPO path. ``group_index``
    ``[N]`` must hold each prompt's rows consecutively, ``teacher_repeat`` of them."""
    n = group_index.numel()
    if teacher_repeat < 1 or n % teacher_repeat:
        raise ValueError(f"{n} rows cannot be split into groups of teacher_repeat={teacher_repeat}")
    groups = group_index.view(-1, teacher_repeat)
    if not bool((groups == groups[:, :1]).all()):
        raise ValueError("rows of a prompt must be consecutive for the teacher-forced diagnostic")
    return torch.arange(teacher_repeat, dtype=torch.float32).repeat(n // teacher_repeat)


@dataclass
class KLController:
    """Coefficient of the in-reward KL penalty (``algorithm.kl_ctrl``).

    ``fixed`` keeps ``coef``. ``adaptive`` (Ziegler et al., 2019) multiplies it after each step by
    ``1 + clip(kl / target_kl - 1, -0.2, 0.2) * sequences / horizon``, steering the measured KL
    towards ``target_kl``. ``coef`` is part of the trainer state (checkpointed).
    """

    coef: float
    adaptive: bool = False
    target_kl: float = 0.1
    horizon: int = 10000

    def update(self, kl: float, sequences: int) -> None:
        """Adapt ``coef`` to the step's mean KL over ``sequences`` sequences (no-op when fixed)."""
        if not self.adaptive:
            return
        error = min(max(kl / self.target_kl - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * sequences / self.horizon
