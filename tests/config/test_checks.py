"""Cross-field checks and inherited defaults, all before any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_gad.config import ConfigError, load_config

BASE = ["data.train_files=/d/train.parquet", "actor_rollout_ref.model.path=/m/student",
        "actor_rollout_ref.rollout.n=4"]  # train batch 256 = the default mini-batch (prompts)


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _load(*overrides: str, world_size: int = 1, yaml_path: str | None = None):
    return load_config(yaml_path, [*BASE, *overrides], world_size=world_size)


def _fails(needle: str, *overrides: str, world_size: int = 1, yaml_path: str | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        _load(*overrides, world_size=world_size, yaml_path=yaml_path)
    assert needle in str(err.value), str(err.value)
    return str(err.value)


def test_required_keys() -> None:
    with pytest.raises(ConfigError, match="data.train_files"):
        load_config(None, ["actor_rollout_ref.rollout.n=4"])
    with pytest.raises(ConfigError, match="actor_rollout_ref.model.path is required"):
        load_config(None, ["actor_rollout_ref.rollout.n=4", "data.train_files=/d/t.parquet"])


def test_mini_batch_counts_prompts_times_n_over_dp_and_micro() -> None:
    ok = _load("actor_rollout_ref.ppo_mini_batch_size=8", "actor_rollout_ref.ppo_micro_batch_size_per_gpu=8",
               world_size=4)  # 8 prompts * 4 = 32 sequences, 8 per DP rank, 1 micro-batch
    assert ok.actor_rollout_ref.actor.ppo_mini_batch_size == 8
    _fails("data.train_batch_size=16 is not divisible by actor_rollout_ref.ppo_mini_batch_size=6",
           "data.train_batch_size=16", "actor_rollout_ref.ppo_mini_batch_size=6", "actor_rollout_ref.ppo_micro_batch_size_per_gpu=1")
    _fails("3 * 4 = 12 sequences is not divisible by the data-parallel size 8",
           "data.train_batch_size=15", "actor_rollout_ref.ppo_mini_batch_size=3",
           "actor_rollout_ref.ppo_micro_batch_size_per_gpu=1", world_size=8)
    _fails("is not divisible by actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
           "actor_rollout_ref.ppo_mini_batch_size=4", "actor_rollout_ref.ppo_micro_batch_size_per_gpu=3", world_size=2)
    _fails("critic.ppo_mini_batch_size * rollout.n", "actor_rollout_ref.ppo_mini_batch_size=8",
           "actor_rollout_ref.ppo_micro_batch_size_per_gpu=8", "critic.ppo_mini_batch_size=1", world_size=8)
    _fails("world size 6 is not divisible by actor_rollout_ref.actor TP x PP = 4",
           "actor_rollout_ref.megatron.tensor_model_parallel_size=4", "actor_rollout_ref.ppo_mini_batch_size=16",
           "actor_rollout_ref.ppo_micro_batch_size_per_gpu=4", world_size=6)


def test_world_size_defaults_to_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("actor_rollout_ref.ppo_mini_batch_size=16", "actor_rollout_ref.ppo_micro_batch_size_per_gpu=64")
    load_config(None, [*BASE, *args])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="data-parallel rank per mini-batch"):
        load_config(None, [*BASE, *args])


def test_tp_and_pp_must_fit_the_model_config(tmp_path: Path) -> None:
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3}))
    sizes = ("actor_rollout_ref.ppo_mini_batch_size=16", "actor_rollout_ref.ppo_micro_batch_size_per_gpu=8")
    ok = _load(f"actor_rollout_ref.model.path={model}", "actor_rollout_ref.megatron.tensor_model_parallel_size=2",
               *sizes, world_size=2)
    assert ok.critic.megatron.tensor_model_parallel_size == 2  # critic inherits the actor's layout
    msg = _fails("num_key_value_heads=2 is not divisible by TP=4", f"actor_rollout_ref.model.path={model}",
                 "actor_rollout_ref.megatron.tensor_model_parallel_size=4", *sizes, world_size=4)
    assert str(model) in msg
    _fails("num_hidden_layers=3 is not divisible by PP=2", f"actor_rollout_ref.model.path={model}",
           "actor_rollout_ref.megatron.pipeline_model_parallel_size=2", *sizes, world_size=2)
    _fails("critic.megatron (TP=1, PP=1) differs from actor_rollout_ref.megatron (TP=2, PP=1)",
           "actor_rollout_ref.megatron.tensor_model_parallel_size=2", "critic.megatron.tensor_model_parallel_size=1",
           *sizes, world_size=2)


def test_algorithm_combinations() -> None:
    _fails("grpo needs actor_rollout_ref.rollout.n >= 2", "actor_rollout_ref.rollout.n=1")
    _load("actor_rollout_ref.rollout.n=1", "algorithm.adv_estimator=gae")
    for mode in ("gspo", "gspo_token"):
        msg = _fails("seq-mean-token-sum", f"actor_rollout_ref.actor.policy_loss={mode}",
                     "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum")
        assert f"policy_loss={mode}" in msg and "use seq-mean-token-mean" in msg
        # the one rule (megatron_gad.losses.policy.check_policy_aggregation), named by its section
        assert (f"actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum is invalid with "
                f"actor_rollout_ref.actor.policy_loss={mode}") in msg, msg
    _load("actor_rollout_ref.actor.policy_loss=ppo", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum")
    # PPO's dual-clip constant is checked when the config loads, not at the first policy update
    _fails("actor_rollout_ref.actor.clip_ratio_c must be > 1.0 for dual clip, got 0.5",
           "actor_rollout_ref.actor.policy_loss=ppo", "actor_rollout_ref.actor.clip_ratio_c=0.5")
    _load("actor_rollout_ref.actor.policy_loss=gspo", "actor_rollout_ref.actor.clip_ratio_c=0.5")  # unused by GSPO


def test_trainer_checks(tmp_path: Path) -> None:
    _fails("trainer.resume_mode='/no/such/ckpt'", "trainer.resume_mode=/no/such/ckpt")
    assert _load(f"trainer.resume_mode={tmp_path}").trainer.resume_mode == str(tmp_path)
    _fails("trainer.save_freq must be -1 (only at the end) or >= 1, got 0", "trainer.save_freq=0")
    _fails("set generator_warmup_steps or generator_warmup_epochs, not both",
           "trainer.generator_warmup_steps=2", "trainer.generator_warmup_epochs=1")
    _fails("custom_reward_function.path: no such file", "custom_reward_function.path=/no/reward.py")
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        _fails("trainer.logger includes 'tensorboard' but the 'tensorboard' package is not installed",
               "trainer.logger=[console,tensorboard]")
    else:
        _load("trainer.logger=[console,tensorboard]")


def test_critic_section_checks_and_engine_settings() -> None:
    _fails("critic.cliprange_value must be >= 0", "critic.cliprange_value=-0.1")
    _fails("critic.teacher_repeat must be >= 0", "critic.teacher_repeat=-1")
    _fails("critic.ppo_epochs must be >= 1, got 0", "critic.ppo_epochs=0")  # the engine's rule, stated once
    _fails("critic.ppo_micro_batch_size_per_gpu must be >= 1, got 0", "critic.ppo_micro_batch_size_per_gpu=0")
    cfg = _load("critic.cliprange_value=0.2", "actor_rollout_ref.ppo_micro_batch_size_per_gpu=4")
    settings = cfg.critic.loss_settings()
    assert (settings.cliprange_value, settings.ppo_micro_batch_size_per_gpu, settings.loss_agg_mode) == (0.2, 4, "token-mean")


def test_inherited_defaults() -> None:
    cfg = _load("data.max_response_length=24", "data.max_prompt_length=32", "trainer.seed=5",
                "trainer.experiment_name=exp1")
    assert cfg.actor_rollout_ref.rollout.response_length == 24
    assert cfg.actor_rollout_ref.rollout.prompt_length == 32
    assert cfg.actor_rollout_ref.rollout.seed == 5 and cfg.data.seed == 5
    assert cfg.critic.model.path == "/m/student"
    assert cfg.critic.ppo_mini_batch_size == cfg.actor_rollout_ref.actor.ppo_mini_batch_size
    assert cfg.trainer.default_local_dir.endswith("megatron_gad/exp1")
    cfg = _load("data.max_response_length=24", "actor_rollout_ref.rollout.response_length=16")
    assert cfg.actor_rollout_ref.rollout.response_length == 16


def test_design_place_and_verl_place_of_ppo_batch_keys(tmp_path: Path) -> None:
    """actor_rollout_ref.<k> (design) vs actor_rollout_ref.actor.<k> (verl): CLI beats YAML;
    within one source the design's place wins; different values in one source are refused."""
    def yaml_file(arr: dict) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"actor_rollout_ref": arr}))
        return str(path)

    cfg = _load(yaml_path=yaml_file({"ppo_mini_batch_size": 8, "ppo_epochs": 2}))
    arr = cfg.actor_rollout_ref
    assert arr.actor.ppo_mini_batch_size == arr.ppo_mini_batch_size == 8 and arr.actor.ppo_epochs == 2
    cfg = _load(yaml_path=yaml_file({"actor": {"ppo_mini_batch_size": 4}}))
    assert cfg.actor_rollout_ref.ppo_mini_batch_size == cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 4
    _fails("actor_rollout_ref.ppo_mini_batch_size=8 and actor_rollout_ref.actor.ppo_mini_batch_size=4 are both set",
           yaml_path=yaml_file({"ppo_mini_batch_size": 8, "actor": {"ppo_mini_batch_size": 4}}))
    path = yaml_file({"ppo_mini_batch_size": 8})
    assert _load("actor_rollout_ref.actor.ppo_mini_batch_size=4", yaml_path=path).actor_rollout_ref.ppo_mini_batch_size == 4
    path = yaml_file({"actor": {"ppo_mini_batch_size": 4}})
    assert _load("actor_rollout_ref.ppo_mini_batch_size=8", yaml_path=path).actor_rollout_ref.actor.ppo_mini_batch_size == 8
    _fails("both set in the command line", "actor_rollout_ref.ppo_epochs=1", "actor_rollout_ref.actor.ppo_epochs=2")
    _fails("actor_rollout_ref.ppo_epochs must be >= 1, got 0", "actor_rollout_ref.ppo_epochs=0")


def test_teacher_repeat_must_divide_n() -> None:
    _fails("critic.teacher_repeat=3 must divide actor_rollout_ref.rollout.n=4", "critic.teacher_repeat=3",
           "actor_rollout_ref.rollout.n=4")


def test_kl_controller_settings_are_checked() -> None:
    _fails("algorithm.kl_ctrl.kl_coef must be >= 0, got -0.1", "algorithm.kl_ctrl.kl_coef=-0.1")
    _fails("algorithm.kl_ctrl.target_kl must be > 0, got 0.0", "algorithm.kl_ctrl.target_kl=0",
           "algorithm.kl_ctrl.type=adaptive")
    _fails("algorithm.kl_ctrl.horizon must be >= 1, got 0", "algorithm.kl_ctrl.horizon=0")


def test_critic_mini_batch_must_align_with_the_actor_layout() -> None:
    _fails("critic.ppo_mini_batch_size=3 must be a multiple of", "critic.ppo_mini_batch_size=3")
