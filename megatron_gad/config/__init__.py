"""Typed run configuration: YAML files plus dotted command-line overrides, in verl's section layout.

``load_config(yaml_path, overrides)`` returns a :class:`TrainConfig` whose sections are typed
dataclasses (``data``, ``algorithm``, ``actor_rollout_ref``, ``critic``, ``trainer``,
``custom_reward_function``). Errors a user can cause raise :class:`ConfigError` (one line,
naming the dotted key, with the valid keys or choices).

Rules, in order of application:

* verl's launch-script keys (``trainer.n_gpus_per_node``, ``actor_rollout_ref.actor.megatron.*``,
  ``trainer.resume_from_path``, ...) are first mapped onto ours or refused in one line
  (``verl_compat.py``; the README's "verl keys" table).
* defaults <- the YAML file <- ``dotted.key=value`` overrides (left to right; later wins). Values
  are typed by the fields: ``1e-6`` is a float, ``true``/``false`` booleans, ``null`` clears an
  optional value, lists are ``[a,b]`` or ``a,b``.
* ``ppo_mini_batch_size`` / ``ppo_micro_batch_size_per_gpu`` / ``ppo_epochs`` may sit under
  ``actor_rollout_ref`` or ``actor_rollout_ref.actor`` (verl's place): the command line beats
  YAML, within one source ``actor_rollout_ref.<key>`` wins, different values in one source are refused.
* inherited values: ``critic.model.path`` / ``critic.megatron`` / critic batch sizes default to the
  actor's; ``rollout.prompt_length`` / ``response_length`` to ``data.max_*_length``;
  ``data.seed`` / ``rollout.seed`` to ``trainer.seed``; ``trainer.default_local_dir`` to
  ``checkpoints/<project_name>/<experiment_name>``.
* cross-field checks (``checks.py``), before any model is built: batch sizes (``train_batch_size``
  and ``ppo_mini_batch_size`` count prompts, a mini-batch is ``ppo_mini_batch_size * rollout.n``
  sequences split over DP = WORLD_SIZE / (TP * PP), in micro-batches of
  ``ppo_micro_batch_size_per_gpu`` sequences), TP/PP against the model's ``config.json``, GRPO
  needs ``n >= 2``, GSPO refuses ``seq-mean-token-sum``, resume path, logger packages.

Relative paths are taken from the current directory (the example configs expect the repo root).
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
