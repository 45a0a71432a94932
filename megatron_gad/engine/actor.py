"""The actor engine: the student policy's log-probs, its PPO / GSPO update and its SFT warm-up step.

A frozen engine (built with ``optim=None``) of the same model serves as the reference policy.
Every method is called by EVERY rank in lockstep with the SAME batch on all ranks of a
data-parallel replica; different DP replicas pass their own rows. Results are returned on every
rank (broadcast from the last pipeline stage).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from megatron_gad.engine.batch import (PolicyBatch, SequenceBatch, SftBatch, by_length, permutation, shuffled, split_rows,
                                       take_rows)
from megatron_gad.engine.config import ActorConfig
from megatron_gad.engine.engine import RoleEngine
from megatron_gad.engine.forward_step import collect_log_probs, policy_loss_func, sft_loss_func
from megatron_gad.engine.reduce import MetricAccumulator, global_count, mean_metrics
from megatron_gad.losses import agg_normalizer
from megatron_gad.models.actor import build_actor
from megatron_gad.models.build import OptimConfig
from megatron_gad.models.transformer import ModelArgs

#: Shuffle seed of epoch e of the update at step s: s * _SHUFFLE_SEEDS_PER_STEP + e (distinct for
#: every (step, epoch) while ppo_epochs < _SHUFFLE_SEEDS_PER_STEP).
_SHUFFLE_SEEDS_PER_STEP = 1000
_POLICY_METRICS = ("actor/pg_loss", "actor/entropy", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl")


class ActorEngine(RoleEngine):
    """GPT policy on Megatron (TP x PP x DP) with its optimizer (None: frozen reference)."""

    def __init__(self, chunks: list, config: Any, optimizer: Any | None = None, *, args: ModelArgs,
                 settings: ActorConfig) -> None:
        super().__init__(chunks, config, optimizer)
        self.args = args
        self.settings = settings

    @classmethod
    def create(cls, config: Any, args: ModelArgs, settings: ActorConfig | None = None,
               optim: OptimConfig | None = None) -> "ActorEngine":
        """Build the actor (``optim`` given) or a frozen reference (``optim=None``); all ranks."""
        settings = settings or ActorConfig()
        settings.validate()
        provider = lambda cfg, pre, post: build_actor(cfg, args, pre, post)  # noqa: E731
        return cls.build(provider, config, optim, args=args, settings=settings)

    def compute_log_probs(self, batch: SequenceBatch, temperature: float,
                          micro_batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Forward-only log-probs and entropy of the responses, both fp32 ``[B, R]`` on every rank.

        ``temperature`` divides the logits before the softmax (use the rollout's). Micro-batches
        of ``micro_batch_size`` rows (default ``ppo_micro_batch_size_per_gpu``).
        """
        size = micro_batch_size or self.settings.ppo_micro_batch_size_per_gpu
        collect = functools.partial(collect_log_probs, temperature=temperature, vocab_size=self.args.vocab)
        shape = (batch.rows, batch.response_mask.shape[1], 2)
        both = self.infer(batch, collect, size, "log_prob_micro_batch_size_per_gpu", shape)
        return both[..., 0], both[..., 1]

    def update(self, batch: PolicyBatch, *, temperature: float, mini_batch_size: int | None = None,
               shuffle_seed: int = 0) -> dict[str, float]:
        """``ppo_epochs`` passes of the policy loss over ``batch`` (this DP rank's rows), one
        optimizer step per mini-batch of ``mini_batch_size`` local rows (default: all of them,
        see :func:`engine.config.local_mini_batch_size`): mini-batch k is local rows
        ``[k m, (k+1) m)`` on every DP rank (after a per-epoch row shuffle when ``shuffle``,
        seeded by ``shuffle_seed`` and the epoch: pass the training step, so that a resumed run
        shuffles as an uninterrupted one).
        Returns metrics averaged over
        mini-batches: ``actor/pg_loss``, ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``,
        ``actor/ppo_kl``, ``actor/entropy``, (``actor/kl_loss``), ``actor/grad_norm``, ``actor/lr``.
        """
        self.require_optimizer()
        size = mini_batch_size or batch.rows
        results = []
        for epoch in range(self.settings.ppo_epochs):
            rows = shuffled(batch, shuffle_seed * _SHUFFLE_SEEDS_PER_STEP + epoch) if self.settings.shuffle else batch
            for mini in split_rows(rows, size, "actor mini-batch size (local sequences)"):
                results.append(self._policy_step(mini, temperature)[0])
        return mean_metrics(results)

    def update_on_policy(self, batch: PolicyBatch, *, temperature: float,
                         shuffle_seed: int = 0) -> tuple[dict[str, float], Tensor, Tensor]:
        """The strictly on-policy update (one epoch, one mini-batch of all local rows) without a
        separate old-log-prob pass: the old log-probs are the training forward's own, detached,
        so the ratio is exactly 1 and the loss and gradients are those of :meth:`update` given
        the recomputed log-probs. ``batch.old_log_probs`` must be None. Returns the metrics of
        :meth:`update` and that forward's log-probs and entropy, fp32 ``[B, R]`` on every rank
        in ``batch``'s row order (what :meth:`compute_log_probs` would have returned)."""
        self.require_optimizer()
        if batch.old_log_probs is not None:
            raise ValueError("update_on_policy takes the old log-probs from its own forward; pass old_log_probs=None")
        if self.settings.ppo_epochs != 1:
            raise ValueError(f"an on-policy update runs one epoch, not ppo_epochs={self.settings.ppo_epochs}")
        # the one epoch's shuffle, as update() draws it
        perm = permutation(batch.rows, shuffle_seed * _SHUFFLE_SEEDS_PER_STEP) if self.settings.shuffle else None
        rows = take_rows(batch, perm) if perm is not None else batch
        out: list[Tensor] = []
        metrics, order = self._policy_step(rows, temperature, out)
        both = self.share_outputs(out, (batch.rows, batch.seq.response_mask.shape[1], 2))
        if order is not None:  # back to the order of ``rows``
            both = torch.empty_like(both).index_copy_(0, order, both)
        if perm is not None:  # back to the batch's row order
            both = torch.empty_like(both).index_copy_(0, perm, both)
        return metrics, both[..., 0], both[..., 1]

    def _policy_step(self, mini: PolicyBatch, temperature: float,
                     out: list[Tensor] | None = None) -> tuple[dict[str, float], Tensor | None]:
        """One optimizer step over ``mini``; returns its metrics and the row order the
        micro-batches took (None: ``mini``'s own), which ``out`` follows.

        With one pipeline stage and several micro-batches, the rows go into micro-batches by
        response length, then prompt length: each micro-batch is cut to its own longest row, so
        fewer padding positions are computed. The loss shares use the mini-batch's normaliser,
        so the step does not depend on which rows share a micro-batch."""
        s = self.settings
        size = s.ppo_micro_batch_size_per_gpu
        order = None
        if self.own_shapes() and 0 < size < mini.rows:
            order = by_length(mini.seq)
            mini = take_rows(mini, order)
        micro = split_rows(mini, size, "actor.ppo_micro_batch_size_per_gpu")
        normalizer = global_count(agg_normalizer(mini.seq.response_mask, s.loss_agg_mode))
        names = _POLICY_METRICS + (("actor/kl_loss",) if s.use_kl_loss else ())
        acc = MetricAccumulator(names)
        loss_func = functools.partial(policy_loss_func, s, temperature, self.args.vocab, normalizer,
                                      self.loss_scale(len(micro)), acc, out=out)
        return self.train_step(micro, loss_func, acc, "actor"), order

    def sft_update(self, batch: SftBatch, micro_batch_size: int | None = None) -> dict[str, float]:
        """One optimizer step of token-mean NLL over ``batch.loss_mask`` tokens (the generator
        warm-up on teacher responses). Returns ``actor/sft_loss``, ``actor/grad_norm``, ``actor/lr``."""
        self.require_optimizer()
        size = micro_batch_size or self.settings.ppo_micro_batch_size_per_gpu
        micro = split_rows(batch, size, "actor.ppo_micro_batch_size_per_gpu")
        normalizer = global_count(batch.loss_mask[:, 1:].float().sum())
        acc = MetricAccumulator(["actor/sft_loss"])
        loss_func = functools.partial(sft_loss_func, self.args.vocab, normalizer, self.loss_scale(len(micro)), acc)
        return self.train_step(micro, loss_func, acc, "actor")
