"""Role engines on Megatron's pipeline schedule: the actor (policy) and the critic
(discriminator / value model), their typed batches and settings."""

from megatron_gad.engine.actor import ActorEngine
from megatron_gad.engine.batch import PairBatch, PolicyBatch, SequenceBatch, SftBatch, ValueBatch, split_rows
from megatron_gad.engine.config import ActorConfig, CriticLossConfig, local_mini_batch_size
from megatron_gad.engine.critic import CriticEngine
from megatron_gad.engine.engine import RoleEngine

__all__ = [
    "ActorConfig",
    "ActorEngine",
    "CriticEngine",
    "CriticLossConfig",
    "PairBatch",
    "PolicyBatch",
    "RoleEngine",
    "SequenceBatch",
    "SftBatch",
    "ValueBatch",
    "local_mini_batch_size",
    "split_rows",
]
