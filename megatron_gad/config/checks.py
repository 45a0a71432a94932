"""Resolution of inherited defaults and the cross-field checks of a loaded :class:`TrainConfig`.

Both run on every rank inside :func:`megatron_gad.config.load_config`, before any process group
or model exists, so a bad combination fails in a second with every problem listed at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from megatron_gad.config.fields import ConfigError
from megatron_gad.config.schema import ACTOR_KEYS_AT_TOP, MegatronConfig, TrainConfig


def _source_rank(key: str, yaml_keys: set[str], cli_keys: set[str]) -> int:
    return 2 if key in cli_keys else 1 if key in yaml_keys else 0


def merge_actor_keys(cfg: TrainConfig, yaml_keys: set[str], cli_keys: set[str]) -> None:
    """Reconcile ``actor_rollout_ref.<k>`` with ``actor_rollout_ref.actor.<k>`` (verl's place).

    The command line beats YAML; within one source ``actor_rollout_ref.<k>`` wins, and two different
    values in one source are refused. Afterwards both places hold the value in force.
    """
    actor_rollout = cfg.actor_rollout_ref
    for key in ACTOR_KEYS_AT_TOP:
        top, low = f"actor_rollout_ref.{key}", f"actor_rollout_ref.actor.{key}"
        top_val, low_val = getattr(actor_rollout, key), getattr(actor_rollout.actor, key)
        top_rank = _source_rank(top, yaml_keys, cli_keys) if top_val is not None else 0
        low_rank = _source_rank(low, yaml_keys, cli_keys)
        if top_rank and top_rank == low_rank and top_val != low_val:
            where = "the command line" if top_rank == 2 else "the YAML file"
            raise ConfigError(
                f"{top}={top_val} and {low}={low_val} are both set in {where}; set only one "
                f"(they are the same setting)"
            )
        value = top_val if top_rank >= low_rank and top_rank else low_val
        setattr(actor_rollout.actor, key, value)
        setattr(actor_rollout, key, value)


def resolve_defaults(cfg: TrainConfig, given: set[str] = frozenset()) -> None:
    """Fill the values that default to another section's (documented on each field).

    ``given`` holds the dotted keys the user set (YAML or command line); a key in it is kept.
    The rollout's prompt/response lengths follow ``data``; the rollout's and the data order's
    seeds follow ``trainer.seed``.
    """
    actor_rollout, critic, trainer, rollout = cfg.actor_rollout_ref, cfg.critic, cfg.trainer, cfg.actor_rollout_ref.rollout
    if not critic.model.path:
        critic.model.path = actor_rollout.model.path
    if critic.megatron is None:
        critic.megatron = dataclasses.replace(actor_rollout.megatron)
    if critic.ppo_mini_batch_size is None:
        critic.ppo_mini_batch_size = actor_rollout.actor.ppo_mini_batch_size
    if critic.ppo_micro_batch_size_per_gpu is None:
        critic.ppo_micro_batch_size_per_gpu = actor_rollout.actor.ppo_micro_batch_size_per_gpu
    inherited = {"response_length": cfg.data.max_response_length, "prompt_length": cfg.data.max_prompt_length,
                 "seed": trainer.seed}
    for key, value in inherited.items():
        if hasattr(rollout, key) and (f"actor_rollout_ref.rollout.{key}" not in given
                                      or getattr(rollout, key) is None):
            setattr(rollout, key, value)
    if "data.seed" not in given:
        cfg.data.seed = trainer.seed
    if not trainer.default_local_dir:
        trainer.default_local_dir = os.path.join("checkpoints", trainer.project_name, trainer.experiment_name)


def _batch_problems(role: str, mini: int, micro: int, n: int, layout: MegatronConfig, world: int) -> list[str]:
    """Divisibility of one role's mini-batch (prompts x n sequences) over DP and micro-batches."""
    problems = []
    if mini < 1 or micro < 1:
        return [f"{role}.ppo_mini_batch_size ({mini}) and ppo_micro_batch_size_per_gpu ({micro}) must be >= 1"]
    model_parallel = layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size
    if world % model_parallel:
        return [f"world size {world} is not divisible by {role} TP x PP = {model_parallel}"]
    dp = world // model_parallel
    sequences = mini * n
    if sequences % dp:
        problems.append(
            f"{role}.ppo_mini_batch_size * rollout.n = {mini} * {n} = {sequences} sequences is not "
            f"divisible by the data-parallel size {dp}"
        )
    elif (sequences // dp) % micro:
        problems.append(
            f"{sequences // dp} sequences per data-parallel rank per mini-batch ({role}.ppo_mini_batch_size"
            f" {mini} * n {n} / DP {dp}) is not divisible by {role}.ppo_micro_batch_size_per_gpu={micro}"
        )
    return problems


def _model_problems(role: str, model_path: str, layout: MegatronConfig) -> list[str]:
    """TP divides heads / KV heads / 128 and PP divides layers, when ``config.json`` is readable."""
    from megatron_gad.models.transformer import check_divisibility

    config_file = Path(model_path) / "config.json"
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    if not config_file.is_file():
        return []
    try:
        hf = json.loads(config_file.read_text())
        heads = int(hf["num_attention_heads"])
        groups = int(hf.get("num_key_value_heads") or heads)
        layers = int(hf["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{role}.model.path: cannot read heads/layers from {config_file}: {exc!r}"]
    try:
        check_divisibility(tp=tp, pp=pp, heads=heads, groups=groups, layers=layers)
    except ValueError as exc:
        return [f"{role}.megatron (TP={tp}, PP={pp}) does not fit the model at {model_path}: {exc}"]
    return []


def _algorithm_problems(cfg: TrainConfig) -> list[str]:
    rollout = cfg.actor_rollout_ref.rollout
    problems = []
    repeat = cfg.critic.teacher_repeat
    if repeat and rollout.n % repeat:
        problems.append(f"critic.teacher_repeat={repeat} must divide actor_rollout_ref.rollout.n={rollout.n} "
                        "(each prompt's rollouts are valued 0..teacher_repeat-1 in turn)")
    kl = cfg.algorithm.kl_ctrl
    for ok, key, expected, value in ((kl.kl_coef >= 0, "kl_coef", ">= 0", kl.kl_coef),
                                     (kl.target_kl > 0, "target_kl", "> 0", kl.target_kl),
                                     (kl.horizon >= 1, "horizon", ">= 1", kl.horizon)):
        if not ok:
            problems.append(f"algorithm.kl_ctrl.{key} must be {expected}, got {value}")
    if cfg.algorithm.adv_estimator == "grpo" and rollout.n < 2:
        problems.append(
            f"algorithm.adv_estimator=grpo needs actor_rollout_ref.rollout.n >= 2 (got {rollout.n}): "
            "a group of one response has advantage 0, so nothing would be learned"
        )
    return problems


def _trainer_problems(cfg: TrainConfig) -> list[str]:
    from megatron_gad.metrics import missing_logger_backends

    trainer, problems = cfg.trainer, []
    if trainer.total_training_steps is not None and trainer.total_training_steps < 1:
        problems.append(f"trainer.total_training_steps must be >= 1 or null, got {trainer.total_training_steps}")
    for name, minus_one in (("save_freq", "only at the end"), ("test_freq", "off")):
        value = getattr(trainer, name)
        if value == 0 or value < -1:
            problems.append(f"trainer.{name} must be -1 ({minus_one}) or >= 1, got {value}")
    if trainer.resume_mode not in ("auto", "disable") and not os.path.exists(trainer.resume_mode):
        problems.append(
            f"trainer.resume_mode={trainer.resume_mode!r}: expected auto, disable or an existing checkpoint path"
        )
    problems += missing_logger_backends(trainer.logger)
    reward = cfg.custom_reward_function
    if reward.path is not None and not os.path.isfile(reward.path):
        problems.append(f"custom_reward_function.path: no such file {reward.path!r}")
    if not reward.name.isidentifier():
        problems.append(f"custom_reward_function.name must be a Python identifier, got {reward.name!r}")
    return problems


def _layout_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    actor_rollout, critic = cfg.actor_rollout_ref, cfg.critic
    assert critic.megatron is not None and critic.ppo_mini_batch_size is not None
    assert critic.ppo_micro_batch_size_per_gpu is not None
    n, problems = actor_rollout.rollout.n, []
    if cfg.data.train_batch_size % actor_rollout.actor.ppo_mini_batch_size:
        problems.append(
            f"data.train_batch_size={cfg.data.train_batch_size} is not divisible by "
            f"actor_rollout_ref.ppo_mini_batch_size={actor_rollout.actor.ppo_mini_batch_size} (both count prompts)"
        )
    if critic.ppo_mini_batch_size % actor_rollout.actor.ppo_mini_batch_size or cfg.data.train_batch_size % critic.ppo_mini_batch_size:
        problems.append(
            f"critic.ppo_mini_batch_size={critic.ppo_mini_batch_size} must be a multiple of "
            f"actor_rollout_ref.ppo_mini_batch_size={actor_rollout.actor.ppo_mini_batch_size} and divide "
            f"data.train_batch_size={cfg.data.train_batch_size} (prompts are laid out over DP by actor mini-batch)"
        )
    problems += _batch_problems("actor_rollout_ref.actor", actor_rollout.actor.ppo_mini_batch_size,
                                actor_rollout.actor.ppo_micro_batch_size_per_gpu, n, actor_rollout.megatron, world_size)
    problems += _batch_problems("critic", critic.ppo_mini_batch_size, critic.ppo_micro_batch_size_per_gpu,
                                n, critic.megatron, world_size)
    if critic.megatron != actor_rollout.megatron:
        problems.append(
            f"critic.megatron ({_layout(critic.megatron)}) differs from actor_rollout_ref.megatron "
            f"({_layout(actor_rollout.megatron)}): both roles share one Megatron parallel state; use the same sizes"
        )
    problems += _model_problems("actor_rollout_ref", actor_rollout.model.path, actor_rollout.megatron)
    if critic.model.path != actor_rollout.model.path:
        problems += _model_problems("critic", critic.model.path, critic.megatron)
    return problems


def _layout(layout: MegatronConfig) -> str:
    return f"TP={layout.tensor_model_parallel_size}, PP={layout.pipeline_model_parallel_size}"


def validate_config(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Run every cross-field check; raise one ConfigError listing all problems found.

    ``world_size`` defaults to ``$WORLD_SIZE`` (set by torchrun), else 1. Called on every rank
    before ``init_distributed``.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    problems = []
    if not cfg.data.train_files:
        problems.append("data.train_files is required (one or more parquet files)")
    if not cfg.actor_rollout_ref.model.path:
        problems.append("actor_rollout_ref.model.path is required (a Hugging Face model directory)")
    problems += _algorithm_problems(cfg)
    problems += _trainer_problems(cfg)
    problems += _layout_problems(cfg, world_size)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
