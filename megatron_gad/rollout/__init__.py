"""Rollouts: streaming weight export from Megatron into HF names, and the rollout engines.

``vllm`` is imported only when the vllm engine is built, so this package works without it.
"""

from megatron_gad.rollout.base import (
    RolloutConfig,
    RolloutConfigError,
    RolloutEngine,
    RolloutOutput,
    TokenSpec,
    WeightBucket,
    make_rollout_engine,
    resolve_engine_name,
)
from megatron_gad.rollout.weight_export import ExportStats, ParamMeta, WeightExporter, sync_weights

__all__ = [
    "ExportStats",
    "ParamMeta",
    "RolloutConfig",
    "RolloutConfigError",
    "RolloutEngine",
    "RolloutOutput",
    "TokenSpec",
    "WeightBucket",
    "WeightExporter",
    "make_rollout_engine",
    "resolve_engine_name",
    "sync_weights",
]
