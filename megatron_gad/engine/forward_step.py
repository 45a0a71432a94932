"""``forward_step`` and the last-stage loss functions of the actor and the critic.

Megatron's schedule calls ``forward_step(data_iterator, model) -> (output, loss_func)`` on every
stage; ``loss_func(output)`` runs on the LAST stage only and returns ``(scaled_loss, {})``.

Positions in a ``[prompt (P) | response (R)]`` sequence:

* actor: the log-prob of response token t comes from the logits at position ``P - 1 + t``
  (the token before it), i.e. ``logits[:, P-1 : P+R-1]``; the output layer computes only those
  positions (:func:`logit_window`; in SFT, from the position before the first target token to
  the one before the last);
* critic values (PPO): the value of response token t is read at the same position
  ``P - 1 + t`` (the state the token is generated from; verl's convention);
* critic sequence scores (GAD): read at the LAST valid response token itself, UNSHIFTED
  (:func:`megatron_gad.models.critic.sequence_scores`).

Each loss function receives the GLOBAL normaliser of its mini-batch and returns its share of the
mini-batch loss times ``scale`` (``num_microbatches * dp``, see ``engine.py``), and adds detached
metric tensors to a :class:`MetricAccumulator` (no host synchronisation).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from megatron_gad.engine.batch import PairBatch, PolicyBatch, SequenceBatch, SftBatch, ValueBatch, model_inputs, to_device
from megatron_gad.engine.config import ActorConfig
from megatron_gad.engine.reduce import MetricAccumulator
from megatron_gad.losses import agg_loss, discriminator_half_points, discriminator_loss, kl_penalty
from megatron_gad.losses import policy_loss, value_loss
from megatron_gad.models.actor import logits_at
from megatron_gad.models.critic import sequence_scores
from megatron_gad.models.inputs import attention_mask_4d
from megatron_gad.ops import vocab_parallel_log_probs_and_entropy
from megatron_gad.runtime.distributed import device

LossFunc = Callable[[Any, Tensor], tuple[Tensor, dict]]


def make_forward_step(loss_func: LossFunc) -> Callable:
    """A Megatron ``forward_step`` that runs the model on the next micro-batch and binds it to
    ``loss_func(micro_batch, output)``. Every stage calls it; the loss runs on the last. An
    actor's output layer computes logits in the micro-batch's :func:`logit_window` only (a
    critic has none: the window does not concern it)."""

    def forward_step(data_iterator, model):
        host = next(data_iterator)
        window = logit_window(host)  # from the host copy: an SFT window reads the mask's values
        batch = to_device(host, device())
        input_ids, position_ids, attention_mask = model_inputs(batch)
        with logits_at(window):
            output = model(input_ids=input_ids, position_ids=position_ids,
                           attention_mask=attention_mask_4d(attention_mask))
        if isinstance(batch, SftBatch):  # the SFT loss aligns its targets with the same window
            return output, functools.partial(loss_func, batch, window=window)
        return output, functools.partial(loss_func, batch)

    return forward_step


def logit_window(batch: Any) -> tuple[int, int] | None:
    """The sequence positions ``[start, stop)`` whose logits a loss of ``batch`` reads: for
    responses ``[P - 1, P + R - 1)``; for SFT, from the position before the first column with a
    target token to the one before the last such column; None for other batches (all positions)."""
    if isinstance(batch, PolicyBatch):
        batch = batch.seq
    if isinstance(batch, SequenceBatch):
        prompt = batch.prompt_length
        return prompt - 1, prompt + batch.response_mask.shape[1] - 1
    if isinstance(batch, SftBatch):
        cols = torch.nonzero(batch.loss_mask[:, 1:].bool().any(0)).flatten()
        if not cols.numel():  # no target token: any one position (the loss is 0)
            return 0, 1
        return int(cols[0]), int(cols[-1]) + 1
    return None


def _windowed(logits: Tensor, window: tuple[int, int]) -> Tensor:
    """``logits`` at the positions of ``window``: as they come inside :func:`logits_at`, or cut
    from logits over the whole sequence."""
    start, stop = window
    if logits.shape[1] == stop - start:
        return logits
    return logits[:, start:stop]


def response_log_probs(logits: Tensor, seq: SequenceBatch, temperature: float,
                       vocab_size: int) -> tuple[Tensor, Tensor]:
    """Log-probs and entropy ``[B, R]`` of ``seq``'s responses from the actor's logits
    (``[B, R, V/TP]`` in the :func:`logit_window`, or ``[B, P+R, V/TP]`` over the whole sequence)."""
    logits = _windowed(logits, logit_window(seq))
    return vocab_parallel_log_probs_and_entropy(logits, seq.responses, temperature, vocab_size)


def response_values(token_scores: Tensor, response_width: int) -> Tensor:
    """Per-token values ``[B, R]`` from critic outputs ``[B, P+R]`` (position ``P - 1 + t``)."""
    return token_scores[:, -response_width - 1:-1]


def collect_log_probs(out: list[Tensor], batch: Any, logits: Tensor, *, temperature: float,
                      vocab_size: int) -> tuple[Tensor, dict]:
    """Forward-only: append this micro-batch's log-probs and entropy, stacked ``[b, R, 2]``."""
    seq = batch.seq if isinstance(batch, PolicyBatch) else batch
    out.append(torch.stack(response_log_probs(logits, seq, temperature, vocab_size), dim=-1))
    return torch.zeros((), device=logits.device), {}


def collect_critic(out: list[Tensor], batch: Any, token_scores: Tensor, *, kind: str) -> tuple[Tensor, dict]:
    """Forward-only: append sequence scores ``[b]`` (``kind='scores'``) or values ``[b, R]``."""
    seq = batch.seq if isinstance(batch, ValueBatch) else batch
    if kind == "scores":
        out.append(sequence_scores(token_scores, seq.response_mask, seq.prompt_length))
    else:
        out.append(response_values(token_scores, seq.response_mask.shape[1]))
    return torch.zeros((), device=token_scores.device), {}


def policy_loss_func(settings: ActorConfig, temperature: float, vocab_size: int, normalizer: Tensor,
                     scale: float, acc: MetricAccumulator, batch: PolicyBatch,
                     logits: Tensor, *, out: list[Tensor] | None = None) -> tuple[Tensor, dict]:
    """PPO / GSPO loss of one micro-batch (+ entropy bonus, + KL to the reference).

    ``batch.old_log_probs`` None (a strictly on-policy update): the old log-probs are this
    forward's, detached. ``out`` given: the detached log-probs and entropy are appended to it,
    stacked ``[b, R', 2]``."""
    mask = batch.seq.response_mask.float()
    log_prob, entropy = response_log_probs(logits, batch.seq, temperature, vocab_size)
    if out is not None:
        out.append(torch.stack([log_prob.detach(), entropy.detach()], dim=-1))
    old_log_prob = log_prob.detach() if batch.old_log_probs is None else batch.old_log_probs.float()
    mode = settings.loss_agg_mode
    pg_loss, pg_metrics = policy_loss(
        settings.policy_loss, log_prob, old_log_prob, batch.advantages.float(), mask,
        settings.clip_low, settings.clip_high, mode,
        clip_ratio_c=settings.clip_ratio_c if settings.policy_loss == "ppo" else None, normalizer=normalizer,
    )
    entropy_agg = agg_loss(entropy, mask, mode, normalizer)
    loss = pg_loss - settings.entropy_coeff * entropy_agg if settings.entropy_coeff else pg_loss
    if settings.use_kl_loss:
        if batch.ref_log_probs is None:
            raise ValueError("actor_rollout_ref.actor.use_kl_loss is set but the batch has no ref_log_probs")
        kl = agg_loss(kl_penalty(log_prob, batch.ref_log_probs.float(), settings.kl_loss_type), mask, mode, normalizer)
        loss = loss + settings.kl_loss_coef * kl
        acc.add_sum("actor/kl_loss", kl)
    tokens = mask.sum()
    acc.add_sum("actor/pg_loss", pg_loss)
    acc.add_sum("actor/entropy", entropy_agg)
    acc.add_count("actor/pg_clipfrac", pg_metrics["pg_clipped"], pg_metrics["pg_clip_units"])
    acc.add_count("actor/pg_clipfrac_lower", pg_metrics["pg_clipped_lower"], batch.seq.response_mask.sum())
    acc.add_mean("actor/ppo_kl", pg_metrics["ppo_kl"], tokens)
    return loss * scale, {}


def sft_loss_func(vocab_size: int, normalizer: Tensor, scale: float, acc: MetricAccumulator,
                  batch: SftBatch, logits: Tensor, *, window: tuple[int, int] | None = None) -> tuple[Tensor, dict]:
    """Token-mean negative log-likelihood of the ``loss_mask`` tokens (shifted by one).
    ``window``: the batch's :func:`logit_window`, when the caller has it (computing it reads the
    mask, which on a GPU waits for the device)."""
    start, stop = window or logit_window(batch)
    logits = _windowed(logits, (start, stop))
    log_prob, _ = vocab_parallel_log_probs_and_entropy(logits, batch.input_ids[:, start + 1:stop + 1], 1.0, vocab_size)
    mask = batch.loss_mask[:, start + 1:stop + 1].float()
    loss = agg_loss(-log_prob, mask, "token-mean", normalizer)
    acc.add_sum("actor/sft_loss", loss)
    return loss * scale, {}


def discriminator_loss_func(num_pairs: Tensor, scale: float, acc: MetricAccumulator, batch: PairBatch,
                            token_scores: Tensor) -> tuple[Tensor, dict]:
    """Bradley-Terry loss of one micro-batch of pairs: its share of the mini-batch mean.

    ``token_scores`` ``[2b, S]``: rows ``:b`` are the students, ``b:`` the paired teachers.
    """
    b, prompt = batch.rows, batch.student.prompt_length
    student = sequence_scores(token_scores[:b], batch.student.response_mask, prompt)
    teacher = sequence_scores(token_scores[b:], batch.teacher.response_mask, prompt)
    loss = discriminator_loss(teacher, student) * (b / num_pairs.clamp(min=1.0))
    weight = torch.tensor(float(b), device=token_scores.device)
    acc.add_sum("critic/d_loss", loss)
    acc.add_count("critic/d_acc", discriminator_half_points(teacher, student), 2 * b)
    acc.add_mean("critic/student_value_mean", student.mean(), weight)
    acc.add_mean("critic/teacher_value_mean", teacher.mean(), weight)
    return loss * scale, {}


def value_loss_func(cliprange_value: float, loss_agg_mode: str, normalizer: Tensor, scale: float,
                    acc: MetricAccumulator, batch: ValueBatch, token_scores: Tensor) -> tuple[Tensor, dict]:
    """Clipped value loss of one micro-batch (values at positions ``P - 1 + t``)."""
    mask = batch.seq.response_mask.float()
    vpreds = response_values(token_scores, mask.shape[1])
    loss, metrics = value_loss(vpreds, batch.old_values.float(), batch.returns.float(), mask, cliprange_value,
                               loss_agg_mode, normalizer)
    tokens = mask.sum()
    acc.add_sum("critic/vf_loss", loss)
    acc.add_count("critic/vf_clipfrac", metrics["vf_clipped"], batch.seq.response_mask.sum())
    acc.add_mean("critic/vpred_mean", metrics["vpred_mean"], tokens)
    return loss * scale, {}


__all__ = [
    "collect_critic", "collect_log_probs", "discriminator_loss_func", "logit_window", "make_forward_step",
    "policy_loss_func", "response_log_probs", "response_values", "sft_loss_func", "value_loss_func",
]
