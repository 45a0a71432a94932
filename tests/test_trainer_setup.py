"""Trainer set-up: how prompts are laid out over data-parallel ranks, and mode checks."""

from __future__ import annotations

import os

import pytest

from megatron_gad.config import load_config
from megatron_gad.data.batch import Mode
from megatron_gad.trainer_setup import check_mode, dp_rows

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")


def test_each_local_mini_batch_is_a_share_of_the_same_global_mini_batch() -> None:
    # 8 prompts, mini-batches of 4: global mini-batch 0 = prompts 0-3, 1 = prompts 4-7.
    assert dp_rows(8, 1, 0, 4) == list(range(8))
    assert dp_rows(8, 2, 0, 4) == [0, 1, 4, 5] and dp_rows(8, 2, 1, 4) == [2, 3, 6, 7]
    for dp in (1, 2, 4):
        local_minis = [dp_rows(8, dp, r, 4) for r in range(dp)]
        for k in range(2):  # local mini-batch k of every rank = global mini-batch k
            share = 4 // dp
            assert sorted(p for rows in local_minis for p in rows[k * share:(k + 1) * share]) == list(range(4 * k, 4 * k + 4))
    with pytest.raises(ValueError, match="mini-batches of 4 prompts over 3"):
        dp_rows(8, 3, 0, 4)


def test_validation_splits_unevenly() -> None:
    parts = [dp_rows(200, 3, r, None) for r in range(3)]
    assert sorted(p for rows in parts for p in rows) == list(range(200))


def test_mode_checks() -> None:
    user = ["data.train_files=/d/train.parquet", "actor_rollout_ref.model.path=/m/student"]
    cfg = load_config(os.path.join(CONFIGS, "gad_gspo.yaml"), [*user, "algorithm.adv_estimator=gae"])
    with pytest.raises(ValueError, match="adv_estimator=gae needs a value critic"):
        check_mode(cfg, Mode.GAD)
    cfg = load_config(os.path.join(CONFIGS, "gspo.yaml"), [*user, "custom_reward_function.path=null"])
    with pytest.raises(ValueError, match="set custom_reward_function.path"):
        check_mode(cfg, Mode.STANDARD)
    cfg = load_config(os.path.join(CONFIGS, "demo.yaml"), [])
    with pytest.raises(ValueError, match="need GAD data"):
        check_mode(cfg, Mode.STANDARD)
    check_mode(cfg, Mode.GAD)


def test_model_and_tokenizer_directories_are_checked_by_key(tmp_path) -> None:
    """A missing or non-HF directory names its config key (never a hub lookup or a traceback)."""
    from transformers import LlamaConfig

    from megatron_gad.trainer_setup import load_hf_config, load_tokenizer

    with pytest.raises(ValueError, match=r"^critic.model.path is required$"):
        load_hf_config(None, "critic.model.path")
    with pytest.raises(ValueError, match=r"actor_rollout_ref.model.path='/no/such/dir': no such directory"):
        load_hf_config("/no/such/dir", "actor_rollout_ref.model.path")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"critic.model.path='.*empty' is not a Hugging Face model directory"):
        load_hf_config(str(empty), "critic.model.path")
    with pytest.raises(ValueError, match=r"actor_rollout_ref.model.tokenizer_path='.*empty' holds no usable tokenizer"):
        load_tokenizer(str(empty), "actor_rollout_ref.model.tokenizer_path")
    LlamaConfig(num_hidden_layers=1).save_pretrained(str(tmp_path / "ok"))
    assert load_hf_config(str(tmp_path / "ok"), "critic.model.path").num_hidden_layers == 1


def test_critic_role_is_decided_by_mode_and_estimator() -> None:
    from megatron_gad.trainer_setup import CriticRole

    assert CriticRole.decide(Mode.GAD, "grpo") is CriticRole.DISCRIMINATOR
    assert CriticRole.decide(Mode.STANDARD, "gae") is CriticRole.VALUE
    assert CriticRole.decide(Mode.STANDARD, "grpo") is CriticRole.NONE


def test_step_phases_follow_the_two_warmups() -> None:
    from megatron_gad.trainer import Phase, step_phase

    phases = [step_phase(step, generator_warmup_end=2, policy_start=5) for step in range(7)]
    assert phases == [Phase.GENERATOR_WARMUP] * 2 + [Phase.CRITIC_WARMUP] * 3 + [Phase.POLICY] * 2
    assert [step_phase(s, 0, 0) for s in range(2)] == [Phase.POLICY] * 2
    assert [step_phase(s, 0, 1) for s in range(2)] == [Phase.CRITIC_WARMUP, Phase.POLICY]


def test_what_a_run_reads_before_any_model_is_built(assets, tmp_path) -> None:
    """read_run_inputs (the launcher's preflight, and every rank's set-up): GAD data makes the
    critic the discriminator, read with its weights; standard data under GRPO builds no critic,
    so its directory is never read; a missing actor weight file is named before any data is read."""
    from transformers import AutoConfig

    from megatron_gad.hf_io import ConversionError
    from megatron_gad.trainer_setup import CriticRole, read_run_inputs
    from tests.helpers import DEMO_REWARD

    models = [f"actor_rollout_ref.model.path={assets.student_dir}",
              f"actor_rollout_ref.model.tokenizer_path={assets.tokenizer_dir}"]
    gad = load_config(os.path.join(CONFIGS, "gad_gspo.yaml"), [
        *models, f"critic.model.path={assets.discriminator_dir}", f"data.train_files={assets.train_file}",
        f"data.val_files={assets.val_file}", "actor_rollout_ref.rollout.name=cpu"], world_size=1)
    inputs = read_run_inputs(gad)
    assert inputs.train_loader.mode is Mode.GAD and inputs.critic_role is CriticRole.DISCRIMINATOR
    assert inputs.weight_sources == {"actor": "safetensors", "critic": "safetensors"}
    assert inputs.critic_hf is not None and inputs.tokenizer_dir == str(assets.tokenizer_dir)
    standard = load_config(os.path.join(CONFIGS, "gspo.yaml"), [
        *models, f"critic.model.path={tmp_path / 'never_read'}", f"data.train_files={assets.train_standard_file}",
        "data.val_files=[]", "actor_rollout_ref.rollout.name=cpu",
        f"custom_reward_function.path={DEMO_REWARD}", "custom_reward_function.name=demo_reward"], world_size=1)
    inputs = read_run_inputs(standard)
    assert inputs.critic_role is CriticRole.NONE and inputs.critic_hf is None and inputs.val_loader is None
    assert inputs.weight_sources == {"actor": "safetensors"}
    config_only = str(tmp_path / "config_only")
    AutoConfig.from_pretrained(str(assets.student_dir)).save_pretrained(config_only)
    no_weights = load_config(os.path.join(CONFIGS, "gad_gspo.yaml"), [
        f"actor_rollout_ref.model.path={config_only}", f"data.train_files={tmp_path / 'no_such.parquet'}",
        "actor_rollout_ref.rollout.name=cpu"], world_size=1)
    with pytest.raises(ConversionError, match=f"^actor_rollout_ref.model.path: no weights found in {config_only} "):
        read_run_inputs(no_weights)
