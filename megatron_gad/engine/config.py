"""Settings of the actor and critic training engines (the ``actor_rollout_ref.actor`` and ``critic`` keys).

``ActorConfig`` is the ``actor_rollout_ref.actor`` section of the training config;
``CriticLossConfig`` holds the fields of the ``critic`` section that the critic engine reads.
Batch sizes: ``ppo_mini_batch_size`` counts PROMPTS (each with ``rollout.n`` responses) over the
whole data-parallel world; ``ppo_micro_batch_size_per_gpu`` counts SEQUENCES (discriminator:
student/teacher PAIRS) per data-parallel rank. :func:`local_mini_batch_size` converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_gad.losses import KL_KINDS, LOSS_AGG_MODES, POLICY_LOSS_MODES, check_choice
from megatron_gad.losses.policy import check_dual_clip, check_policy_aggregation
from megatron_gad.models.build import OptimConfig


def choices(values: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Field metadata restricting a str (or list[str]) field to ``values`` (checked by the config
    loader, :mod:`megatron_gad.config.fields`, which names the valid choices)."""
    return {"choices": values}


@dataclass
class ActorConfig:
    """``actor_rollout_ref.actor``: the policy objective and its optimisation."""

    policy_loss: str = field(default="gspo", metadata=choices(POLICY_LOSS_MODES))
    """Policy objective: ``ppo`` (token ratio), ``gspo`` (sequence ratio), ``gspo_token``."""
    loss_agg_mode: str = field(default="seq-mean-token-mean", metadata=choices(LOSS_AGG_MODES))
    """How per-token losses are aggregated (GSPO needs ``seq-mean-token-mean``)."""
    clip_ratio: float = 0.2
    """Symmetric clip range of the importance ratio."""
    clip_ratio_low: float | None = None
    """Lower clip range (None: ``clip_ratio``); the GSPO paper uses 3e-4."""
    clip_ratio_high: float | None = None
    """Upper clip range (None: ``clip_ratio``); the GSPO paper uses 4e-4."""
    clip_ratio_c: float = 3.0
    """Dual-clip constant for ``ppo`` with negative advantages (> 1); unused by the GSPO modes."""
    ppo_epochs: int = 1
    """Passes over each step's rollouts."""
    ppo_mini_batch_size: int = 256
    """PROMPTS per optimizer step over all data-parallel ranks (times ``rollout.n`` sequences)."""
    ppo_micro_batch_size_per_gpu: int = 8
    """SEQUENCES per micro-batch on each data-parallel rank."""
    shuffle: bool = False
    """Shuffle this rank's rows before splitting them into mini-batches, anew each epoch."""
    entropy_coeff: float = 0.0
    """Weight of the entropy bonus (0: entropy is only reported)."""
    use_kl_loss: bool = False
    """Add ``kl_loss_coef * KL(actor || ref)`` to the policy loss (needs the reference model)."""
    kl_loss_coef: float = 0.001
    """Weight of the KL loss."""
    kl_loss_type: str = field(default="low_var_kl", metadata=choices(KL_KINDS))
    """Estimator of the KL loss: ``kl``, ``abs``, ``mse`` or ``low_var_kl``."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer of the actor."""

    @property
    def clip_low(self) -> float:
        """Lower clip range in force."""
        return self.clip_ratio if self.clip_ratio_low is None else self.clip_ratio_low

    @property
    def clip_high(self) -> float:
        """Upper clip range in force."""
        return self.clip_ratio if self.clip_ratio_high is None else self.clip_ratio_high

    def validate(self, where: str = "actor_rollout_ref.actor") -> None:
        """Raise ValueError naming ``where.<field>`` for an invalid setting."""
        check_choice(f"{where}.policy_loss", self.policy_loss, POLICY_LOSS_MODES)
        check_choice(f"{where}.loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        check_choice(f"{where}.kl_loss_type", self.kl_loss_type, KL_KINDS)
        check_policy_aggregation(self.policy_loss, self.loss_agg_mode, where)
        if self.policy_loss == "ppo":  # the GSPO modes have no dual clip
            check_dual_clip(self.clip_ratio_c, where)
        for name in ("clip_low", "clip_high"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.clip_ratio_{name[5:]} must be >= 0, got {getattr(self, name)}")
        if self.ppo_epochs < 1 or self.ppo_micro_batch_size_per_gpu < 1 or self.ppo_mini_batch_size < 1:
            raise ValueError(f"{where}.ppo_epochs, ppo_mini_batch_size and ppo_micro_batch_size_per_gpu must be >= 1")
        self.optim.validate(f"{where}.optim")


@dataclass
class CriticLossConfig:
    """The ``critic`` fields the critic engine reads (the config layer's ``critic`` section maps
    onto it field by field)."""

    ppo_epochs: int = 1
    """Passes over each step's batch."""
    ppo_micro_batch_size_per_gpu: int = 8
    """SEQUENCES (discriminator: student/teacher PAIRS) per micro-batch per data-parallel rank."""
    cliprange_value: float = 0.5
    """Clip range of the value loss around the rollout-time values (standard mode)."""
    loss_agg_mode: str = field(default="token-mean", metadata=choices(LOSS_AGG_MODES))
    """Aggregation of the value loss (standard mode)."""

    def validate(self, where: str = "critic") -> None:
        """Raise ValueError naming ``where.<field>`` for an invalid setting."""
        check_choice(f"{where}.loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        if self.cliprange_value < 0:
            raise ValueError(f"{where}.cliprange_value must be >= 0, got {self.cliprange_value}")
        for name in ("ppo_epochs", "ppo_micro_batch_size_per_gpu"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")


def local_mini_batch_size(ppo_mini_batch_size: int, n: int, dp: int, where: str) -> int:
    """Sequences per data-parallel rank in one mini-batch: ``ppo_mini_batch_size * n / dp``.

    Raises ValueError naming ``where.ppo_mini_batch_size`` when DP does not divide it.
    """
    sequences = ppo_mini_batch_size * n
    if sequences % dp:
        raise ValueError(f"{where}.ppo_mini_batch_size * rollout.n = {sequences} is not divisible by DP={dp}")
    return sequences // dp
