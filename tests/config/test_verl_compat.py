"""verl's launch-script keys: accepted with verl's meaning (same / mapped), or refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_gad.config import ConfigError, config_to_dict, load_config

BASE = ["data.train_files=/d/train.parquet", "actor_rollout_ref.model.path=/m/student", "actor_rollout_ref.rollout.n=2"]

# The keys of a typical verl Megatron launch script (GSM8K / GRPO examples), with verl's values.
VERL_SCRIPT = [
    "trainer.n_gpus_per_node=2", "trainer.nnodes=1", "trainer.device=cpu",
    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1",
    "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=2",
    "actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=1",
    "critic.megatron.tensor_model_parallel_size=2",
    "reward_model.enable=False", "reward_model.micro_batch_size_per_gpu=8",
    "trainer.resume_mode=auto", "trainer.resume_from_path=null", "trainer.log_val_generations=10",
    "data.return_raw_chat=True", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.rollout.val_kwargs.do_sample=False", "actor_rollout_ref.rollout.val_kwargs.n=1",
    "actor_rollout_ref.rollout.val_kwargs.temperature=0", "actor_rollout_ref.rollout.val_kwargs.top_p=1.0",
    "actor_rollout_ref.model.enable_gradient_checkpointing=True", "actor_rollout_ref.model.use_remove_padding=False",
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.1", "critic.optim.lr_warmup_steps_ratio=0.05",
    "actor_rollout_ref.actor.megatron.context_parallel_size=1",
]


@pytest.fixture(autouse=True)
def _no_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_a_verl_launch_script_loads_with_verl_meaning() -> None:
    cfg = load_config(None, [*BASE, "data.train_batch_size=8", "actor_rollout_ref.ppo_mini_batch_size=8",
                             "actor_rollout_ref.ppo_micro_batch_size_per_gpu=8", *VERL_SCRIPT], world_size=2)
    arr = cfg.actor_rollout_ref
    assert (arr.megatron.tensor_model_parallel_size, arr.megatron.pipeline_model_parallel_size) == (2, 1)
    assert cfg.trainer.log_val_generations == 10 and cfg.trainer.resume_mode == "auto"
    assert arr.rollout.log_prob_micro_batch_size_per_gpu == 8
    assert arr.model.enable_gradient_checkpointing and arr.actor.optim.lr_warmup_steps_ratio == 0.1
    assert cfg.critic.optim.lr_warmup_steps_ratio == 0.05


def test_the_critic_takes_the_actors_verl_layout_and_other_sizes_are_refused() -> None:
    """verl gives each role its own Megatron layout; here one parallel state serves every role. A
    critic without sizes of its own runs with the layout verl's actor keys set; a critic whose
    sizes differ is refused in one line naming both layouts (never run with the actor's silently)."""
    base = [*BASE, "data.train_batch_size=8", "actor_rollout_ref.ppo_mini_batch_size=8",
            "actor_rollout_ref.ppo_micro_batch_size_per_gpu=8",
            "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"]
    critic = load_config(None, base, world_size=4).critic.megatron
    assert (critic.tensor_model_parallel_size, critic.pipeline_model_parallel_size) == (2, 1)
    with pytest.raises(ConfigError, match=r"critic.megatron \(TP=1, PP=2\) differs from actor_rollout_ref.megatron "
                                          r"\(TP=2, PP=1\): both roles share one Megatron parallel state"):
        load_config(None, [*base, "critic.megatron.tensor_model_parallel_size=1",
                           "critic.megatron.pipeline_model_parallel_size=2"], world_size=4)


def test_verls_per_role_retentions_are_the_one_retention(tmp_path: Path) -> None:
    """Both roles share one checkpoint directory: ``max_{actor,critic}_ckpt_to_keep`` set
    ``trainer.max_ckpt_to_keep``, must agree (in any source), and a null one is unset."""
    path = tmp_path / "verl.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"max_actor_ckpt_to_keep": 2, "max_critic_ckpt_to_keep": None}}))
    assert load_config(str(path), BASE, world_size=1).trainer.max_ckpt_to_keep == 2
    both = load_config(str(path), [*BASE, "trainer.max_critic_ckpt_to_keep=2"], world_size=1)
    assert both.trainer.max_ckpt_to_keep == 2
    assert load_config(str(path), [*BASE, "trainer.max_ckpt_to_keep=5"], world_size=1).trainer.max_ckpt_to_keep == 5
    with pytest.raises(ConfigError, match=r"trainer.max_actor_ckpt_to_keep=2, trainer.max_critic_ckpt_to_keep=3 "
                                          r"differ \(verl\): here both are trainer.max_ckpt_to_keep"):
        load_config(str(path), [*BASE, "trainer.max_critic_ckpt_to_keep=3"], world_size=1)
    with pytest.raises(ConfigError, match=r"max_critic_ckpt_to_keep=3 and trainer.max_ckpt_to_keep=4 are both on "
                                          r"the command line"):
        load_config(None, [*BASE, "trainer.max_ckpt_to_keep=4", "trainer.max_critic_ckpt_to_keep=3"], world_size=1)
    assert "max_actor_ckpt_to_keep" not in yaml.safe_dump(config_to_dict(both))  # saved as ours
    with pytest.raises(ConfigError, match="max_ckpt_to_keep must be >= 1"):
        load_config(None, [*BASE, "trainer.max_ckpt_to_keep=0"], world_size=1)


def test_the_same_keys_in_a_yaml_file(tmp_path: Path) -> None:
    tree = {
        "data": {"train_files": "/d/train.parquet", "return_raw_chat": True},
        "actor_rollout_ref": {"model": {"path": "/m/student", "use_remove_padding": False},
                              "actor": {"megatron": {"pipeline_model_parallel_size": 2}},
                              "rollout": {"n": 2, "val_kwargs": {"do_sample": False, "temperature": 0}}},
        "reward_model": {"enable": False, "model": {"path": "~/models/rm"}},
        "trainer": {"n_gpus_per_node": 2, "nnodes": 1, "resume_mode": "resume_path",
                    "resume_from_path": str(tmp_path)},
    }
    path = tmp_path / "verl.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(str(path), [], world_size=2)
    assert cfg.actor_rollout_ref.megatron.pipeline_model_parallel_size == 2
    assert cfg.trainer.resume_mode == str(tmp_path)  # verl's resume_path -> ours: resume_mode=<path>
    # the command line beats the file, as for every key
    cfg = load_config(str(path), ["actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1"], world_size=2)
    assert cfg.actor_rollout_ref.megatron.pipeline_model_parallel_size == 1


@pytest.mark.parametrize("override,world,message", [
    ("trainer.n_gpus_per_node=8", 2, r"trainer.n_gpus_per_node x trainer.nnodes = 8 x 1 = 8 \(verl\) but this run has "
                                     r"2 process\(es\): launch with --nproc-per-node 8"),
    ("trainer.nnodes=2", 1, r"= 1 x 2 = 2 \(verl\) but this run has 1 process"),
    ("actor_rollout_ref.ref.megatron.tensor_model_parallel_size=2", 1,
     r"differs from the actor's tensor_model_parallel_size=1: every role shares one Megatron parallel state"),
    ("actor_rollout_ref.model.use_remove_padding=True", 1,
     r"use_remove_padding=True \(verl\) is refused \(on the command line\): sequences are trained padded"),
    ("reward_model.enable=True", 1, r"model-based rewards are not supported.*custom_reward_function.path"),
    ("actor_rollout_ref.rollout.val_kwargs.do_sample=True", 1, r"validation decodes greedily"),
    ("actor_rollout_ref.rollout.val_kwargs.temperature=0.6", 1, r"validation decodes greedily \(temperature 0\)"),
    ("actor_rollout_ref.actor.megatron.context_parallel_size=2", 1, r"context parallelism is not implemented"),
    ("actor_rollout_ref.actor.megatron.sequence_parallel=True", 1, r"sequence parallelism is not implemented"),
    ("actor_rollout_ref.ref.megatron.param_offload=True", 1, r"parameter offloading is not implemented"),
    ("actor_rollout_ref.actor.megatron.no_such_knob=3", 1, r"has no counterpart here .* remove it"),
    ("trainer.resume_from_path=/ckpt/global_step_5", 1, r"read only with trainer.resume_mode=resume_path"),
    ("trainer.resume_mode=resume_path", 1, r"resume_mode=resume_path \(verl\) needs trainer.resume_from_path"),
])
def test_refused_keys_say_what_to_do(override: str, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [*BASE, override], world_size=world)
    assert "\n" not in str(info.value)


def test_device_follows_the_machine() -> None:
    import torch

    here, other = ("cuda", "cpu") if torch.cuda.is_available() else ("cpu", "cuda")
    load_config(None, [*BASE, f"trainer.device={here}"])
    with pytest.raises(ConfigError, match=f"trainer.device={other} \\(verl\\) but this machine runs on {here}"):
        load_config(None, [*BASE, f"trainer.device={other}"])


def test_a_renamed_key_and_ours_must_agree() -> None:
    with pytest.raises(ConfigError, match="are both on the command line; set only one"):
        load_config(None, [*BASE, "actor_rollout_ref.megatron.tensor_model_parallel_size=1",
                           "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"], world_size=2)


def test_lr_warmup_steps_ratio_is_verls_rule() -> None:
    from megatron_gad.models.build import OptimConfig, warmup_lr, warmup_steps

    ratio = OptimConfig(lr=1.0, lr_warmup_steps_ratio=0.25)
    assert warmup_steps(ratio, total_steps=20) == 5  # int(0.25 * 20)
    assert [warmup_lr(ratio, s, 20) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    explicit = OptimConfig(lr=1.0, lr_warmup_steps=2, lr_warmup_steps_ratio=0.25)  # steps win, as in verl
    assert warmup_steps(explicit, 20) == 2
    assert warmup_steps(OptimConfig(lr_warmup_steps=-1, lr_warmup_steps_ratio=0.1), 35) == 3
    assert warmup_lr(OptimConfig(lr=1.0), 0, 20) == 1.0
    with pytest.raises(ConfigError, match="lr_warmup_steps_ratio must lie in"):
        load_config(None, [*BASE, "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=1.5"])
