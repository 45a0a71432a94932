"""A verl user's model directories and launch commands, run the way the user runs them.

A tiny Qwen2 causal LM saved as ``pytorch_model.bin`` (no safetensors) with the
demo's tokenizer; the README's "Training your own models" command with only the user's paths; a
model directory holding only ``config.json``; errors under the fail-fast launcher (exit 2, one
line); the HF -> Megatron -> train -> HF workflow. Runs are one or two steps long.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import CONFIGS, ENV, REPO, comparable, read_metrics

SCRIPT = os.path.join(REPO, "examples", "pretrain_gad.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# README, "Training your own models": the command, then the user's own paths.
README_COMMAND = ["--config", os.path.join(CONFIGS, "gad_gspo.yaml"), "algorithm.adv_estimator=grpo",
                  "actor_rollout_ref.actor.policy_loss=gspo", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
                  "actor_rollout_ref.rollout.n=8", "trainer.critic_warmup=10"]
# What keeps a test run short (one step on 4 prompts); appended after the user's paths.
SHORT_RUN = ["data.train_batch_size=4", "data.max_prompt_length=32", "data.max_response_length=16",
             "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.ppo_mini_batch_size=4",
             "actor_rollout_ref.ppo_micro_batch_size_per_gpu=8", "trainer.total_training_steps=1",
             "trainer.logger=jsonl"]


def tiny_qwen2(out_dir: str, tokenizer_dir: str, seed: int = 5, shards: int = 1) -> dict[str, torch.Tensor]:
    """A random tiny Qwen2ForCausalLM as a ``.bin`` directory (as many published checkpoints are)
    plus the tokenizer; returns its state. transformers 5 always writes safetensors (it ignores
    ``safe_serialization=False``), so the weights are written as transformers 4 wrote them:
    ``torch.save`` of the state dict into ``pytorch_model.bin``, or ``pytorch_model-0000i-of-0000n.bin``
    shards with a ``pytorch_model.bin.index.json`` weight map."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)  # config.json, generation_config.json (+ safetensors, removed below)
    for name in os.listdir(out_dir):
        if "safetensors" in name:
            os.remove(os.path.join(out_dir, name))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    if shards == 1:
        torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
    else:
        weight_map = {}
        for i, part in enumerate(names[j::shards] for j in range(shards)):
            file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({n: state[n] for n in part}, os.path.join(out_dir, file))
            weight_map.update({n: file for n in part})
        with open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    return state


@pytest.fixture(scope="module")
def bin_model(assets, tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    out = str(tmp_path_factory.mktemp("bin_model") / "qwen2")
    state = tiny_qwen2(out, str(assets.tokenizer_dir))
    assert os.listdir(out) and not any(f.endswith(".safetensors") for f in os.listdir(out))
    return out, state


@pytest.fixture(scope="module")
def small_val(assets, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("val") / "val.parquet")
    pq.write_table(pq.read_table(str(assets.val_file)).slice(0, 4), path)
    return path


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def read_exported(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


# ------------------------------------------------------------------------------ weights (local)
def test_bin_files_single_and_sharded_read_as_the_model(assets, tmp_path) -> None:
    from megatron_gad.hf_io import SafetensorsReader, weight_format

    single = str(tmp_path / "single")
    state = tiny_qwen2(single, str(assets.tokenizer_dir))
    sharded = str(tmp_path / "sharded")
    tiny_qwen2(sharded, str(assets.tokenizer_dir), shards=3)
    shards = sorted(f for f in os.listdir(sharded) if f.endswith(".bin"))
    assert len(shards) > 1 and os.path.isfile(os.path.join(sharded, "pytorch_model.bin.index.json"))
    os.remove(os.path.join(sharded, "pytorch_model.bin.index.json"))  # shards found without the index too
    for directory in (single, sharded):
        assert weight_format(directory) == "bin"
        reader = SafetensorsReader(directory)
        assert set(reader.keys()) == set(state)
        for name, tensor in state.items():
            assert reader.shape(name) == tuple(tensor.shape) and torch.equal(reader.get(name), tensor)


def test_a_model_directory_without_weights_is_an_error(assets, tmp_path) -> None:
    from transformers import AutoConfig

    from megatron_gad.hf_io import ConversionError, check_model_weights

    config_only = str(tmp_path / "config_only")
    AutoConfig.from_pretrained(str(assets.student_dir)).save_pretrained(config_only)
    with pytest.raises(ConversionError, match=rf"actor_rollout_ref.model.path: no weights found in {config_only} .*"
                                              r"actor_rollout_ref.model.random_init=true"):
        check_model_weights(config_only, "actor_rollout_ref.model.path", "actor", random_init=False)
    assert check_model_weights(config_only, "critic.model.path", "critic", random_init=True) == "random"
    with open(os.path.join(config_only, "pytorch_model.bin"), "wb") as f:
        f.write(b"not a pickle")
    from megatron_gad.hf_io import SafetensorsReader

    with pytest.raises(ConversionError, match="pytorch_model.bin is not a readable PyTorch weights file"):
        SafetensorsReader(config_only)


# ------------------------------------------------------------------------------ entry points
def test_launcher_refuses_a_config_only_model_in_one_line(assets, tmp_path) -> None:
    """Under the launcher, before any worker starts: exit 2 and exactly one line on stderr."""
    from transformers import AutoConfig

    config_only = str(tmp_path / "config_only")
    AutoConfig.from_pretrained(str(assets.student_dir)).save_pretrained(config_only)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(assets.tokenizer_dir, name), config_only)
    proc = run_cli(["--nproc-per-node", "2", *README_COMMAND, f"data.train_files={assets.train_file}",
                    f"actor_rollout_ref.model.path={config_only}"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: actor_rollout_ref.model.path: no weights found in {config_only} (expected *.safetensors, "
        "pytorch_model*.bin or a Megatron checkpoint from hf_to_megatron.py; set "
        "actor_rollout_ref.model.random_init=true to start from random weights)"]


def test_launcher_refuses_vllm_without_cuda_and_verl_world_keys(assets, bin_model) -> None:
    if torch.cuda.is_available():
        pytest.skip("vllm may run on this machine")
    path, _ = bin_model
    user = [f"data.train_files={assets.train_file}", f"actor_rollout_ref.model.path={path}"]
    proc = run_cli(["--check", *README_COMMAND, *user, "actor_rollout_ref.rollout.name=vllm"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "actor_rollout_ref.rollout.name=vllm cannot run here" in proc.stderr
    proc = run_cli(["--nproc-per-node", "2", *README_COMMAND, *user, "trainer.n_gpus_per_node=4"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "trainer.n_gpus_per_node x trainer.nnodes = 4 x 1 = 4 (verl) but this run has 2 process(es)" in proc.stderr


def test_readme_command_checks_with_only_the_users_paths(assets, bin_model) -> None:
    """The README's command plus the user's data and model paths passes every check (config,
    model directory, tokenizer from the model directory, every data row)."""
    path, _ = bin_model
    proc = run_cli(["--check", *README_COMMAND, f"data.train_files={assets.train_file}",
                    f"actor_rollout_ref.model.path={path}"])
    assert proc.returncode == 0, proc.stderr
    assert f"checks passed: gspo + grpo, actor {path}" in proc.stdout
    assert "demo" not in proc.stdout  # no demo asset in a user's run


@pytest.mark.slow
def test_readme_command_trains_a_bin_model(assets, bin_model, small_val, tmp_path) -> None:
    """The README command on a ``.bin``-only model: its weights (not a random init) are trained
    from, the critic gets a fresh scalar head (said in one line), the validation samples are
    logged (``trainer.log_val_generations``, verl's key), and the config is one summary line."""
    path, state = bin_model
    out = str(tmp_path / "run")
    proc = run_cli([*README_COMMAND, f"data.train_files={assets.train_file}", f"data.val_files={small_val}",
                    f"actor_rollout_ref.model.path={path}", *SHORT_RUN, f"trainer.default_local_dir={out}",
                    "trainer.log_val_generations=2", "trainer.test_freq=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"actor weights: {path} (bin)" in proc.stdout
    assert sum("has no score.weight (a causal LM): its trunk is loaded and a zero scalar head" in line
               for line in proc.stdout.splitlines()) == 1
    assert "policy_loss:" not in proc.stdout and os.path.isfile(os.path.join(out, "config.yaml"))
    assert "finished 1 steps in" in proc.stdout
    # critic_warmup=10 > 1 step: the actor is not updated, so the export is the .bin's weights
    exported = read_exported(os.path.join(out, "actor_hf"))
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name
    with open(os.path.join(out, "val_generations.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["step"] for s in samples] == [0, 0, 1, 1]  # before training and after step 1
    assert all(s["prompt"] and "response" in s and s["teacher_response"] for s in samples)
    assert proc.stdout.count("val sample") == 4


@pytest.mark.slow
def test_a_workers_error_under_the_launcher_is_one_line_and_exit_2(assets, bin_model, tmp_path) -> None:
    """An error that only a worker can find (a resume directory that is not a checkpoint): the
    launcher prints the worker's line once, without torch's ChildFailedError report."""
    path, _ = bin_model
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    proc = run_cli(["--nproc-per-node", "1", *README_COMMAND, f"data.train_files={assets.train_file}",
                    f"actor_rollout_ref.model.path={path}", *SHORT_RUN, f"trainer.default_local_dir={tmp_path / 'run'}",
                    f"trainer.resume_mode={empty}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: trainer.resume_mode='{empty}' is not a complete checkpoint: "), lines


@pytest.mark.slow
def test_hf_to_megatron_to_training_to_hf(assets, bin_model, tmp_path) -> None:
    """README workflow: convert the ``.bin`` model to Megatron checkpoints (actor; critic with a
    fresh score head), train from them (no conversion at start), export HF weights."""
    path, state = bin_model
    tools = os.path.join(REPO, "checkpoint_tools", "hf_to_megatron.py")

    def convert(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, tools, "--hf-dir", path, *args], env=ENV, capture_output=True,
                              text=True, timeout=300)

    actor, critic = str(tmp_path / "meg_actor"), str(tmp_path / "meg_critic")
    assert convert("--out", actor).returncode == 0
    refused = convert("--out", critic, "--role", "critic")
    assert refused.returncode == 2 and "--init-score-head" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    done = convert("--out", critic, "--role", "critic", "--init-score-head", "0.02")
    assert done.returncode == 0 and "hf -> megatron" not in done.stderr  # no progress bar into a log
    out = str(tmp_path / "run")
    wrong = run_cli([*README_COMMAND, f"data.train_files={assets.train_file}", f"actor_rollout_ref.model.path={actor}",
                     *SHORT_RUN, f"trainer.default_local_dir={out}"])
    assert wrong.returncode == 2 and "--role critic --init-score-head" in wrong.stderr  # critic = actor ckpt
    proc = run_cli([*README_COMMAND, f"data.train_files={assets.train_file}", f"actor_rollout_ref.model.path={actor}",
                    f"critic.model.path={critic}", *SHORT_RUN, f"trainer.default_local_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"actor weights: the Megatron checkpoint {actor}" in proc.stdout
    exported = read_exported(os.path.join(out, "actor_hf"))
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name


def _train_demo(overrides: list[str]) -> dict:
    """Per rank: a short demo run from the example config (see :func:`test_gradient_checkpointing_changes_no_number`)."""
    from megatron_gad.config import load_config
    from megatron_gad.trainer import Trainer

    from megatron_gad.models.sharding import unwrap

    trainer = Trainer(load_config(os.path.join(CONFIGS, "demo.yaml"), overrides))
    trainer.fit()
    return {role: unwrap(engine.chunks[0]).config.recompute_granularity
            for role, engine in (("actor", trainer.parts.actor), ("critic", trainer.parts.critic))}


@pytest.mark.slow
@pytest.mark.distributed
def test_gradient_checkpointing_changes_no_number(assets, tmp_path) -> None:
    """verl's ``enable_gradient_checkpointing`` (megatron-core's full activation recompute, for
    both roles) gives the same losses, gradient norms and scores as a run without it."""
    from megatron_gad.runtime.spawn import run_distributed

    def overrides(out: str, recompute: bool) -> list[str]:
        return [f"data.train_files={assets.train_file}", "data.val_files=[]", f"actor_rollout_ref.model.path={assets.student_dir}",
                f"actor_rollout_ref.model.tokenizer_path={assets.tokenizer_dir}", f"critic.model.path={assets.discriminator_dir}",
                "data.train_batch_size=4", "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.ppo_mini_batch_size=4",
                "critic.ppo_mini_batch_size=4",
                "actor_rollout_ref.ppo_micro_batch_size_per_gpu=4", "trainer.total_training_steps=2",
                "trainer.generator_warmup_steps=1", "trainer.critic_warmup=0", "trainer.save_freq=-1",
                "trainer.export_hf=false", "trainer.logger=jsonl", f"trainer.default_local_dir={out}",
                f"actor_rollout_ref.model.enable_gradient_checkpointing={recompute}",
                f"critic.model.enable_gradient_checkpointing={recompute}"]

    rows = {}
    for recompute in (False, True):
        out = str(tmp_path / f"recompute_{recompute}")
        granularity = run_distributed(_train_demo, 1, args=(overrides(out, recompute),), timeout_s=600)[0]
        assert granularity == ({"actor": "full", "critic": "full"} if recompute else {"actor": None, "critic": None})
        rows[recompute] = comparable(read_metrics(out))
    assert [r["step"] for r in rows[True]] == [1, 2] and "actor/sft_loss" in rows[True][0]
    assert "actor/pg_loss" in rows[True][1] and "critic/d_loss" in rows[True][1]
    for plain, recomputed in zip(rows[False], rows[True]):
        assert set(plain) == set(recomputed)
        for key, value in plain.items():
            assert recomputed[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_demo_config_works_on_a_fresh_clone(tmp_path) -> None:
    """``--config examples/configs/demo.yaml`` generates the demo assets on demand, as the run
    without arguments does (a fresh clone has none: they are git-ignored)."""
    clone = tmp_path / "clone"
    shutil.copytree(os.path.join(REPO, "megatron_gad"), clone / "megatron_gad",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(REPO, "examples"), clone / "examples",
                    ignore=shutil.ignore_patterns("__pycache__", "demo"))
    assert not (clone / "examples" / "data" / "demo").exists()
    proc = subprocess.run([sys.executable, str(clone / "examples" / "pretrain_gad.py"), "--check", "--config",
                           "examples/configs/demo.yaml"], cwd=clone, capture_output=True, text=True, timeout=600,
                          env={**ENV, "PYTHONPATH": str(clone)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checks passed" in proc.stdout and (clone / "examples" / "data" / "demo" / "manifest.json").is_file()
