"""Pure-torch losses for GAD / GSPO / PPO (no Megatron import).

The engines plug these into Megatron's ``forward_step -> (output, loss_func)`` contract. Under
micro-batching or data parallelism pass ``normalizer`` = the global count from
``agg_normalizer`` (summed over all pieces of the mini-batch); see ``policy.py``.
Entropy is aggregated with ``entropy_loss`` (an alias of ``agg_loss``).
"""

from megatron_gad.losses.advantages import gae_advantages, grpo_advantages, masked_whiten
from megatron_gad.losses.critic import discriminator_accuracy, discriminator_half_points, discriminator_loss, value_loss
from megatron_gad.losses.policy import (
    KL_KINDS,
    LOSS_AGG_MODES,
    POLICY_LOSS_MODES,
    agg_loss,
    agg_normalizer,
    check_choice,
    entropy_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
)

__all__ = [
    "KL_KINDS",
    "LOSS_AGG_MODES",
    "POLICY_LOSS_MODES",
    "agg_loss",
    "agg_normalizer",
    "check_choice",
    "discriminator_accuracy",
    "discriminator_half_points",
    "discriminator_loss",
    "entropy_loss",
    "gae_advantages",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "value_loss",
]
