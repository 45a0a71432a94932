"""Typed run configuration: YAML files plus dotted command-line overrides, with the design's keys.

``load_config(yaml_path, overrides)`` returns a :class:`TrainConfig` whose sections are typed
dataclasses (``data``, ``algorithm``, ``actor_rollout_ref``, ``critic``, ``trainer``,
``custom_reward_function``). Errors a user can cause raise :class:`ConfigError` naming the key.
"""

from megatron_gad.config.checks import validate_config
from megatron_gad.config.fields import ConfigError
from megatron_gad.config.load import (
    apply_overrides,
    config_to_dict,
    format_config,
    load_config,
    parse_override,
    save_resolved,
)
from megatron_gad.config.schema import (
    ActorConfig,
    ActorRolloutRefConfig,
    AlgorithmConfig,
    CriticConfig,
    DataConfig,
    KLControlConfig,
    MegatronConfig,
    ModelConfig,
    RefConfig,
    RewardFunctionConfig,
    RolloutConfig,
    TrainConfig,
    TrainerConfig,
)

__all__ = [
    "ActorConfig",
    "ActorRolloutRefConfig",
    "AlgorithmConfig",
    "ConfigError",
    "CriticConfig",
    "DataConfig",
    "KLControlConfig",
    "MegatronConfig",
    "ModelConfig",
    "RefConfig",
    "RewardFunctionConfig",
    "RolloutConfig",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "config_to_dict",
    "format_config",
    "load_config",
    "parse_override",
    "save_resolved",
    "validate_config",
]
