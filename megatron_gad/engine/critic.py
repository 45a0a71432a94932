"""The critic engine: the discriminator (GAD) and the value model (standard PPO).

Sequence scores are read at the last valid response token (unshifted); per-token values of
response token t at position ``P - 1 + t`` (see ``forward_step.py``). The discriminator update
runs each micro-batch's student rows and their paired teacher rows in ONE batched forward
(``[2b, S]``), so the pair's two scores come from the same pass. Every method is called by EVERY
rank in lockstep; results are returned on every rank.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from megatron_gad.engine.batch import PairBatch, SequenceBatch, ValueBatch, split_rows
from megatron_gad.engine.config import CriticLossConfig
from megatron_gad.engine.engine import RoleEngine
from megatron_gad.engine.forward_step import collect_critic, discriminator_loss_func, value_loss_func
from megatron_gad.engine.reduce import MetricAccumulator, global_count, mean_metrics
from megatron_gad.losses import agg_normalizer
from megatron_gad.models.build import OptimConfig
from megatron_gad.models.critic import build_critic
from megatron_gad.models.transformer import ModelArgs

_D_METRICS = ("critic/d_loss", "critic/d_acc", "critic/student_value_mean", "critic/teacher_value_mean")
_V_METRICS = ("critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean")


class CriticEngine(RoleEngine):
    """Scalar-head GPT on Megatron (TP x PP x DP) with its optimizer."""

    def __init__(self, chunks: list, config: Any, optimizer: Any | None = None, *,
                 settings: CriticLossConfig) -> None:
        super().__init__(chunks, config, optimizer)
        self.settings = settings

    @classmethod
    def create(cls, config: Any, args: ModelArgs, settings: CriticLossConfig | None = None,
               optim: OptimConfig | None = None) -> "CriticEngine":
        """Build the critic on every rank (``optim=None``: inference only)."""
        settings = settings or CriticLossConfig()
        settings.validate()
        provider = lambda cfg, pre, post: build_critic(cfg, args, pre, post)  # noqa: E731
        return cls.build(provider, config, optim, settings=settings)

    def _micro(self, micro_batch_size: int | None) -> int:
        return micro_batch_size or self.settings.ppo_micro_batch_size_per_gpu

    def compute_scores(self, batch: SequenceBatch, micro_batch_size: int | None = None) -> Tensor:
        """Forward-only sequence scores ``[B]`` fp32 (student or teacher sequences), every rank."""
        return self.infer(batch, functools.partial(collect_critic, kind="scores"), self._micro(micro_batch_size),
                          "critic.ppo_micro_batch_size_per_gpu", (batch.rows,))

    def compute_values(self, batch: SequenceBatch, micro_batch_size: int | None = None) -> Tensor:
        """Forward-only per-token values ``[B, R]`` fp32 (value of token t at ``P - 1 + t``)."""
        return self.infer(batch, functools.partial(collect_critic, kind="values"), self._micro(micro_batch_size),
                          "critic.ppo_micro_batch_size_per_gpu", (batch.rows, batch.response_mask.shape[1]))

    def update_discriminator(self, pairs: PairBatch, *, mini_batch_size: int | None = None) -> dict[str, float]:
        """Bradley-Terry training on aligned (student, teacher) rows, ``ppo_epochs`` passes, one
        optimizer step per mini-batch of ``mini_batch_size`` local pairs (default: all).
        Micro-batches hold ``ppo_micro_batch_size_per_gpu`` PAIRS. Returns ``critic/d_loss``,
        ``critic/d_acc``, ``critic/student_value_mean``, ``critic/teacher_value_mean``,
        ``critic/grad_norm``, ``critic/lr`` averaged over mini-batches."""
        return self._epochs(pairs, mini_batch_size, self._discriminator_step)

    def update_values(self, batch: ValueBatch, *, mini_batch_size: int | None = None) -> dict[str, float]:
        """Clipped value-loss training (standard PPO), like :meth:`update_discriminator`.
        Returns ``critic/vf_loss``, ``critic/vf_clipfrac``, ``critic/vpred_mean``,
        ``critic/grad_norm``, ``critic/lr``."""
        return self._epochs(batch, mini_batch_size, self._value_step)

    def _epochs(self, batch: Any, mini_batch_size: int | None, step: Any) -> dict[str, float]:
        self.require_optimizer()
        results = []
        for _ in range(self.settings.ppo_epochs):
            for mini in split_rows(batch, mini_batch_size or batch.rows, "critic mini-batch size (local rows)"):
                results.append(step(mini))
        return mean_metrics(results)

    def _train(self, mini: Any, names: tuple[str, ...], make_loss: Any) -> dict[str, float]:
        micro = split_rows(mini, self.settings.ppo_micro_batch_size_per_gpu, "critic.ppo_micro_batch_size_per_gpu")
        acc = MetricAccumulator(names)
        return self.train_step(micro, make_loss(self.loss_scale(len(micro)), acc), acc, "critic")

    def _discriminator_step(self, mini: PairBatch) -> dict[str, float]:
        num_pairs = global_count(torch.tensor(float(mini.rows)))
        return self._train(mini, _D_METRICS,
                           lambda scale, acc: functools.partial(discriminator_loss_func, num_pairs, scale, acc))

    def _value_step(self, mini: ValueBatch) -> dict[str, float]:
        s = self.settings
        normalizer = global_count(agg_normalizer(mini.seq.response_mask, s.loss_agg_mode))
        return self._train(mini, _V_METRICS, lambda scale, acc: functools.partial(
            value_loss_func, s.cliprange_value, s.loss_agg_mode, normalizer, scale, acc))
