"""load_config: YAML + dotted overrides with the design's key names, errors, resolved output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_gad.config import ConfigError, TrainConfig, format_config, load_config, save_resolved

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "configs").glob("*.yaml"))

# The "Configuration" block of the design (seed.md), with real-looking paths for its placeholders.
SEED_YAML = """
data: {train_files: /data/train.parquet, train_batch_size: 256, max_prompt_length: 2048, max_response_length: 1536}
algorithm: {adv_estimator: grpo, norm_adv_by_std_in_grpo: true, gamma: 1.0, lam: 0.95}
actor_rollout_ref:
  model: {path: /path/to/model}
  rollout: {n: 8, temperature: 0.8}
  actor: {policy_loss: gspo, loss_agg_mode: seq-mean-token-mean, clip_ratio: 0.2, optim: {lr: 1e-6}}
  ppo_mini_batch_size: 256
  ppo_micro_batch_size_per_gpu: 8
  ppo_epochs: 1
critic: {model: {path: /path/to/reward_model}, optim: {lr: 1e-6}, ppo_epochs: 1, cliprange_value: 0.2}
trainer: {critic_warmup: 10, total_epochs: 2, save_freq: 50}
"""

# The override line of the design, as written (data.train_files gets a value).
SEED_OVERRIDES = (
    "algorithm.adv_estimator=grpo actor_rollout_ref.actor.policy_loss=gspo "
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean actor_rollout_ref.rollout.n=8 "
    "trainer.critic_warmup=10 data.train_files=/data/gad/train.parquet"
).split()

BASE = ["data.train_files=/d/train.parquet", "actor_rollout_ref.model.path=/m/student"]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Example configs use repository-relative paths."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


# The recipes that read assets the repository generates (the demo tasks; the SmolLM2 prepare step)
# name them; every other config is the user's, with the user's paths.
RECIPES = ("demo.yaml", "demo_styles.yaml", "smollm2_distill.yaml")
USER_CONFIGS = [p for p in EXAMPLES if p.name not in (*RECIPES, "qwen7b_multinode.yaml")]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_loads(path: Path) -> None:
    world = 32 if "multinode" in path.name else 1
    given = BASE if path in USER_CONFIGS else []  # the user-facing configs need the user's paths
    cfg = load_config(str(path), given, world_size=world)
    assert isinstance(cfg, TrainConfig) and cfg.data.train_files and cfg.actor_rollout_ref.model.path


@pytest.mark.parametrize("path", USER_CONFIGS, ids=[p.name for p in USER_CONFIGS])
def test_user_configs_name_no_demo_asset(path: Path) -> None:
    """Only demo.yaml points at the demo's assets: a user config with only the model path given
    reads the tokenizer from the model's directory and validates on nothing but the user's data."""
    assert "examples/data/demo" not in path.read_text() and "demo.py" not in path.read_text()
    with pytest.raises(ConfigError, match="data.train_files is required.*model.path is required"):
        load_config(str(path), [])
    cfg = load_config(str(path), BASE)
    assert cfg.actor_rollout_ref.model.tokenizer_path is None  # the model's directory
    assert cfg.data.val_files == [] and cfg.critic.model.path == "/m/student"


def test_examples_cover_demo_and_four_scenarios() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"demo.yaml", "gad_gspo.yaml", "gad_ppo.yaml", "ppo.yaml", "gspo.yaml", "qwen7b_multinode.yaml"} <= names
    multinode = load_config(str(REPO / "examples/configs/qwen7b_multinode.yaml"), [], world_size=32)
    arr = multinode.actor_rollout_ref
    assert (arr.megatron.tensor_model_parallel_size, arr.megatron.pipeline_model_parallel_size) == (4, 2)
    assert (arr.rollout.name, arr.rollout.n, multinode.data.train_batch_size) == ("vllm", 8, 256)
    assert (multinode.data.max_prompt_length, multinode.data.max_response_length) == (2048, 1536)
    assert arr.actor.optim.lr == 1e-6 and multinode.trainer.critic_warmup == 10


def test_seed_yaml_and_override_line_work_as_written(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, SEED_YAML), SEED_OVERRIDES)
    arr = cfg.actor_rollout_ref
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.algorithm.lam == 0.95
    assert (arr.actor.policy_loss, arr.actor.loss_agg_mode) == ("gspo", "seq-mean-token-mean")
    assert arr.rollout.n == 8 and arr.rollout.temperature == 0.8 and cfg.trainer.critic_warmup == 10
    assert cfg.data.train_files == ["/data/gad/train.parquet"]
    assert arr.actor.optim.lr == 1e-6 and cfg.critic.optim.lr == 1e-6 and cfg.critic.cliprange_value == 0.2
    assert (arr.actor.ppo_mini_batch_size, arr.actor.ppo_micro_batch_size_per_gpu, arr.actor.ppo_epochs) == (256, 8, 1)
    assert cfg.critic.model.path == "/path/to/reward_model" and cfg.trainer.save_freq == 50
    # Overrides alone, on the defaults, work too.
    cfg = load_config(None, SEED_OVERRIDES + ["actor_rollout_ref.model.path=/m"])
    assert cfg.actor_rollout_ref.rollout.n == 8 and cfg.critic.model.path == "/m"


def test_overrides_are_typed_and_later_ones_win() -> None:
    cfg = load_config(None, BASE + [
        "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.optim.lr=3e-6", "trainer.logger=[console,jsonl]",
        "data.val_files=a.parquet,b.parquet", "trainer.total_training_steps=null", "algorithm.norm_adv_by_std_in_grpo=false",
        "actor_rollout_ref.actor.optim.betas=[0.9,0.95]", "actor_rollout_ref.rollout.n=2",
    ])
    arr = cfg.actor_rollout_ref
    assert arr.rollout.n == 2 and arr.actor.optim.lr == 3e-6 and arr.actor.optim.betas == (0.9, 0.95)
    assert cfg.trainer.logger == ["console", "jsonl"] and cfg.data.val_files == ["a.parquet", "b.parquet"]
    assert cfg.trainer.total_training_steps is None and cfg.algorithm.norm_adv_by_std_in_grpo is False


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + ["actor_rollout_ref.actor.polciy_loss=gspo"])
    msg = str(err.value)
    assert "'actor_rollout_ref.actor.polciy_loss'" in msg and "did you mean 'actor_rollout_ref.actor.policy_loss'" in msg
    assert "valid keys at 'actor_rollout_ref.actor'" in msg and "loss_agg_mode" in msg
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "trainer: {critic_warmpu: 3}\n"), BASE)
    assert "'trainer.critic_warmpu'" in str(err.value) and "did you mean 'trainer.critic_warmup'" in str(err.value)
    assert "cfg.yaml" in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'tranier'.*did you mean 'trainer'"):
        load_config(None, BASE + ["tranier.seed=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("actor_rollout_ref.actor.policy_loss=grpo", "valid choices: ppo, gspo, gspo_token"),
        ("actor_rollout_ref.actor.loss_agg_mode=mean", "valid choices: token-mean, seq-mean-token-mean, seq-mean-token-sum"),
        ("algorithm.adv_estimator=reinforce", "valid choices: grpo, gae"),
        ("trainer.logger=console,mlflow", "valid choices: console, jsonl, tensorboard, wandb"),
        ("actor_rollout_ref.actor.kl_loss_type=k3", "valid choices: kl, abs, mse, low_var_kl"),
        ("data.truncation=middle", "valid choices: error, left, right"),
        ("actor_rollout_ref.rollout.name=tgi", "must be one of auto, cpu, vllm"),
    ],
)
def test_bad_choice_lists_valid_ones(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + [override])
    assert override.split("=")[0] in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("actor_rollout_ref.rollout.n=eight", "actor_rollout_ref.rollout.n: expected an integer, got 'eight'"),
        ("actor_rollout_ref.actor.optim.lr=fast", "actor_rollout_ref.actor.optim.lr: expected a number"),
        ("trainer.val_before_train=perhaps", "trainer.val_before_train: expected a boolean"),
        ("actor_rollout_ref.megatron.tensor_model_parallel_size=0", "tensor_model_parallel_size must be >= 1"),
        ("actor_rollout_ref.actor.optim.betas=[0.9]", "actor_rollout_ref.actor.optim.betas: expected 2 values"),
        ("actor_rollout_ref.actor.optim.betas=[0.9,1.5]", "actor_rollout_ref.actor.optim.betas must lie in [0, 1)"),
        ("trainer.critic_warmup", "is not of the form dotted.key=value"),
        ("data.train_files.first=x", "'data.train_files' is a list[str] value, not a section"),
    ],
)
def test_type_errors_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + [override])
    assert expected in str(err.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"), BASE)
    with pytest.raises(ConfigError, match="cannot parse config file .*cfg.yaml"):
        load_config(_write(tmp_path, "data: {train_files: [a, b\n"), BASE)
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(_write(tmp_path, "- a\n- b\n"), BASE)
    with pytest.raises(ConfigError, match="'data': expected a mapping|data: expected a mapping"):
        load_config(_write(tmp_path, "data: 3\n"), BASE)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(str(REPO / "examples/configs/demo.yaml"), ["trainer.seed=7", "critic.optim.lr=2e-4", "trainer.critic_warmup=5"])
    out = tmp_path / "run" / "config.yaml"
    save_resolved(cfg, str(out))
    assert load_config(str(out), []) == cfg
    assert yaml.safe_load(out.read_text())["trainer"]["seed"] == 7
    text = format_config(cfg)
    assert "critic_warmup: 5" in text and "policy_loss: gspo" in text
    assert json.dumps(yaml.safe_load(text))  # plain data only
    assert not list(out.parent.glob("*.tmp"))
