"""End-to-end runs of the trainer on the demo task: every scenario, warmups, resume, TP/PP.

Each run is a real ``Trainer`` on spawned gloo ranks with the tiny demo models: rollouts from the
CPU engine, Megatron engines, dist checkpoints. Runs are a few steps long.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess

import pytest
import torch

from megatron_gad.runtime.spawn import run_distributed
from tests.helpers import CONFIGS, comparable, demo_overrides, pretrain_cli, read_metrics, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]


def overrides_for(assets, out_dir: str, gad: bool, **extra: object) -> list[str]:
    """Small, fast settings over an example config, pointed at the test's demo assets."""
    return demo_overrides(assets, out_dir, gad, **{"data.val_batch_size": 8, **extra})


def train(config: str, overrides: list[str]) -> dict:
    """Per rank: load the config and run the trainer; return the last metrics."""
    from megatron_gad.config import load_config
    from megatron_gad.trainer import Trainer

    cfg = load_config(os.path.join(CONFIGS, config), overrides)
    trainer = Trainer(cfg)
    return trainer.fit()


SCENARIOS = [
    ("gad_gspo.yaml", True, ("critic/d_loss", "critic/d_acc", "actor/pg_loss", "actor/pg_clipfrac")),
    ("gad_ppo.yaml", True, ("critic/d_loss", "critic/teacher_value_mean", "actor/pg_loss", "actor/ppo_kl")),
    ("ppo.yaml", False, ("critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "actor/pg_loss")),
    ("gspo.yaml", False, ("critic/score_mean", "actor/pg_loss", "actor/entropy")),
]


@pytest.mark.parametrize("config,gad,expected", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario_trains(assets, tmp_path, config: str, gad: bool, expected: tuple) -> None:
    out = str(tmp_path / "run")
    n = "1" if config == "ppo.yaml" else "2"
    extra = {"actor_rollout_ref.rollout.n": n, "algorithm.adv_estimator": "gae" if config == "ppo.yaml" else "grpo"}
    run_distributed(train, 1, args=(config, overrides_for(assets, out, gad, **extra)), timeout_s=600)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in expected + ("response_length/mean", "rollout/logprob_abs_diff_mean", "timing/rollout"):
        assert all(key in r for r in rows), f"{key} missing from {config} metrics"
    for r in rows:
        for key, value in r.items():
            if key.endswith("_loss"):
                assert value is not None and math.isfinite(value), f"{config}: {key}={value} at step {r['step']}"
    assert max(r["rollout/logprob_abs_diff_max"] for r in rows) < 1e-4  # engine and Megatron agree (fp32)
    if gad:
        assert "critic/d_acc" in rows[0] and rows[-1]["critic/teacher_value_mean"] is not None


def test_demo_discriminator_starts_knowing_nothing(assets, tmp_path) -> None:
    """The demo as configured (its batch sizes, its shipped zero score head): the first logged
    step's discriminator metrics are those of a discriminator that scores everything alike,
    d_loss = ln 2 and d_acc = 0.5 (every pair a tie, counted one half); its update moves the head."""
    out = str(tmp_path / "run")
    paths = {"data.train_files": assets.train_file, "data.val_files": assets.val_file,
             "actor_rollout_ref.model.path": assets.student_dir,
             "actor_rollout_ref.model.tokenizer_path": assets.tokenizer_dir,
             "critic.model.path": assets.discriminator_dir, "trainer.default_local_dir": out,
             "trainer.total_training_steps": 2, "trainer.test_freq": -1, "trainer.save_freq": -1,
             "trainer.export_hf": False, "trainer.logger": "jsonl", "trainer.val_before_train": False}
    run_distributed(train, 1, args=("demo.yaml", [f"{k}={v}" for k, v in paths.items()]), timeout_s=600)
    first, second = read_metrics(out)
    assert first["critic/d_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["critic/d_acc"] == 0.5 and first["critic/teacher_score_gt_student"] == 0.5
    assert first["critic/student_value_mean"] == 0.0 and first["critic/teacher_value_mean"] == 0.0
    assert first["critic/grad_norm"] > 0
    assert second["critic/teacher_value_mean"] != second["critic/student_value_mean"]


def _warmup_probe(overrides: list[str]) -> tuple[bool, bool]:
    """Per rank: does the actor change during the critic warmup, and after it?"""
    from megatron_gad.config import load_config
    from megatron_gad.models.sharding import full_tensors
    from megatron_gad.trainer import Trainer

    trainer = Trainer(load_config(os.path.join(CONFIGS, "gad_gspo.yaml"), overrides))
    snapshot = lambda: {n: t.clone() for n, t in full_tensors(trainer.parts.actor.chunks[0])}  # noqa: E731
    params0, critic0 = snapshot(), dict(full_tensors(trainer.parts.critic.chunks[0]))
    critic0 = {n: t.clone() for n, t in critic0.items()}
    for _ in range(2):  # critic_warmup = 2
        trainer.train_step(trainer.parts.loader.next_batch())
        trainer.step += 1
    params2 = snapshot()
    critic_moved = any(not torch.equal(critic0[n], t) for n, t in full_tensors(trainer.parts.critic.chunks[0]))
    trainer.train_step(trainer.parts.loader.next_batch())
    params3 = snapshot()
    untouched = all(torch.equal(params0[n], params2[n]) for n in params0) and critic_moved
    return untouched, any(not torch.equal(params2[n], params3[n]) for n in params2)


def test_critic_warmup_leaves_the_actor_untouched(assets, tmp_path) -> None:
    overrides = overrides_for(assets, str(tmp_path / "run"), True, **{"trainer.critic_warmup": 2})
    untouched, moved_after = run_distributed(_warmup_probe, 1, args=(overrides,), timeout_s=600)[0]
    assert untouched, "the actor changed during the critic warmup (or the critic did not train)"
    assert moved_after, "the actor did not train after the critic warmup"


LAYOUT_STEPS = {"trainer.total_training_steps": 2, "trainer.generator_warmup_steps": 1}


@pytest.fixture(scope="module")
def single_process_run(assets, tmp_path_factory) -> list[dict]:
    out = str(tmp_path_factory.mktemp("tp1") / "run")
    run_distributed(train, 1, args=("gad_gspo.yaml", overrides_for(assets, out, True, **LAYOUT_STEPS)), timeout_s=600)
    return read_metrics(out)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_layouts_reproduce_the_single_process_run(assets, tmp_path, single_process_run, tp: int,
                                                           pp: int) -> None:
    """The demo assets ship initial weights, so TP=2 and PP=2 runs start from the same model, draw
    the same rollouts and must report the single-process run's metrics (an SFT step, then GAD)."""
    out = str(tmp_path / "run")
    extra = {"actor_rollout_ref.megatron.tensor_model_parallel_size": tp,
             "actor_rollout_ref.megatron.pipeline_model_parallel_size": pp, **LAYOUT_STEPS}
    run_distributed(train, 2, tp=tp, pp=pp, args=("gad_gspo.yaml", overrides_for(assets, out, True, **extra)),
                    timeout_s=600)
    rows, ref = comparable(read_metrics(out)), comparable(single_process_run)
    assert [r["step"] for r in rows] == [1, 2] and "actor/sft_loss" in rows[0] and "actor/pg_loss" in rows[1]
    for got, want in zip(rows, ref):
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), f"TP={tp} PP={pp} step {got['step']}: {key}"


# An adaptive in-reward KL coefficient and the per-epoch row shuffle are trainer state: a resumed
# run must restore the one and reseed the other as the uninterrupted run does.
RESUME_STEPS = {"trainer.total_training_steps": 6, "trainer.save_freq": 2, "trainer.generator_warmup_steps": 1,
                "trainer.critic_warmup": 1, "algorithm.use_kl_in_reward": True, "algorithm.kl_ctrl.type": "adaptive",
                "algorithm.kl_ctrl.horizon": 20, "actor_rollout_ref.actor.shuffle": True,
                "actor_rollout_ref.ppo_epochs": 2, "actor_rollout_ref.ppo_mini_batch_size": 2,
                "actor_rollout_ref.ppo_micro_batch_size_per_gpu": 2}
_ENV_1_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory) -> list[dict]:
    """Metrics of the uninterrupted reference run of the resume tests."""
    out = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    subprocess.run(pretrain_cli(overrides_for(assets, out, True, **RESUME_STEPS)), check=True, env=_ENV_1_THREAD,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    return read_metrics(out)


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every millisecond)."""
    wait_for(proc, ready, what, timeout=600, poll_s=0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _resume_and_compare(assets, out: str, uninterrupted: list[dict]) -> None:
    subprocess.run(pretrain_cli(overrides_for(assets, out, True, **RESUME_STEPS)), check=True, env=_ENV_1_THREAD,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    cut = read_metrics(out)
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    assert comparable(cut) == comparable(uninterrupted)


def test_resume_after_sigkill_matches_an_uninterrupted_run(assets, tmp_path, uninterrupted) -> None:
    out = str(tmp_path / "cut")
    proc = subprocess.Popen(pretrain_cli(overrides_for(assets, out, True, **RESUME_STEPS)), env=_ENV_1_THREAD,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(out, "latest_checkpointed_iteration.txt")
    _kill_when(proc, lambda: os.path.exists(marker) and open(marker).read().strip() == "4", "its step-4 checkpoint")
    _resume_and_compare(assets, out, uninterrupted)


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(assets, tmp_path, uninterrupted) -> None:
    """Killed while global_step_4 is being written: the marker still names step 2, the partial
    directory is discarded, and the resumed run's metrics equal the uninterrupted run's."""
    out = str(tmp_path / "cut")
    proc = subprocess.Popen(pretrain_cli(overrides_for(assets, out, True, **RESUME_STEPS)), env=_ENV_1_THREAD,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = os.path.join(out, "global_step_4.tmp")
    _kill_when(proc, lambda: os.path.isdir(os.path.join(partial, "actor")), "its step-4 save")
    assert os.path.isdir(partial) and not os.path.exists(os.path.join(out, "global_step_4")), "not killed mid-save"
    assert open(os.path.join(out, "latest_checkpointed_iteration.txt")).read().strip() == "2"
    _resume_and_compare(assets, out, uninterrupted)
    assert not os.path.exists(partial)


def _rollout_calls(overrides: list[str]) -> list[tuple]:
    """Per rank: train (resuming when the run directory holds a checkpoint), recording each
    rollout's (seed, n, greedy, responses)."""
    from megatron_gad.config import load_config
    from megatron_gad.trainer import Trainer

    trainer = Trainer(load_config(os.path.join(CONFIGS, "gad_gspo.yaml"), overrides))
    engine, calls = trainer.parts.rollout_engine, []
    generate = engine.generate

    def recorded(*args, **kwargs):
        out = generate(*args, **kwargs)
        calls.append((kwargs["seed"], kwargs["n"], kwargs["greedy"], out.responses.clone()))
        return out

    engine.generate = recorded
    trainer.fit()
    return calls


def test_validation_samples_its_own_stream_and_a_resumed_run_draws_it_again(assets, tmp_path) -> None:
    """The validation after step 2 samples (one response per prompt, n=1) with seeds no training
    rollout uses (it once took step 3's), and a run resumed from step 1 samples the very responses
    of the uninterrupted run at steps 2 and 3."""
    import shutil

    import pyarrow.parquet as pq

    val = str(tmp_path / "val.parquet")
    pq.write_table(pq.read_table(str(assets.val_file)).slice(0, 16), val)  # two batches of 8
    extra = {"trainer.total_training_steps": 3, "trainer.save_freq": 1, "trainer.test_freq": 2, "data.val_files": val}
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    calls = run_distributed(_rollout_calls, 1, args=(overrides_for(assets, full, True, **extra),), timeout_s=600)[0]
    shutil.copytree(full, cut)
    for step in (2, 3):
        shutil.rmtree(os.path.join(cut, f"global_step_{step}"))
    with open(os.path.join(cut, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    resumed = run_distributed(_rollout_calls, 1, args=(overrides_for(assets, cut, True, **extra),), timeout_s=600)[0]
    sampled = [c for c in calls if c[1] == 1 and not c[2]]
    assert len(sampled) == 4  # 2 batches at step 2 and at step 3
    assert not {c[0] for c in sampled} & {c[0] for c in calls if c[1] == 2}  # training: n = 2
    assert len({c[0] for c in sampled}) == 4
    again = [c for c in resumed if c[1] == 1 and not c[2]]
    assert [c[0] for c in again] == [c[0] for c in sampled]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(again, sampled))
    assert comparable(read_metrics(cut)) == comparable(read_metrics(full))


def _weights_after_setup(overrides: list[str], hf_dir: str) -> dict:
    """Per rank: build a trainer whose actor and critic start from the HF causal LM in hf_dir."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_gad.config import load_config
    from megatron_gad.models.hf_mapping import hf_to_megatron_state
    from megatron_gad.models.sharding import full_tensors
    from megatron_gad.trainer import Trainer

    trainer = Trainer(load_config(os.path.join(CONFIGS, "gad_gspo.yaml"), overrides))
    expected = hf_to_megatron_state(load_file(os.path.join(hf_dir, "model.safetensors")),
                                    AutoConfig.from_pretrained(hf_dir), "actor")
    actor = dict(full_tensors(trainer.parts.actor.chunks[0]))
    critic = dict(full_tensors(trainer.parts.critic.chunks[0]))
    return {
        "actor": all(torch.equal(actor[n], expected[n]) for n in expected),
        "critic_trunk": all(torch.equal(critic[f"trunk.{n}"], t) for n, t in expected.items()
                            if n.startswith(("embedding.", "decoder.layers."))),
        "critic_norm": torch.equal(critic["head.norm.weight"], expected["decoder.final_layernorm.weight"]),
        "head_zero": not critic["head.score.weight"].any(),
    }


def test_actor_and_critic_start_from_hf_weights(assets, tmp_path) -> None:
    """Both roles load a real HF checkpoint; the critic takes the causal LM's trunk plus a fresh
    zero scalar head (GAD's "generator plus a scalar head")."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = str(tmp_path / "student_hf")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets.student_dir)).save_pretrained(hf_dir)
    shutil.copy(os.path.join(assets.tokenizer_dir, "tokenizer.json"), hf_dir)
    extra = {"actor_rollout_ref.model.path": hf_dir, "critic.model.path": hf_dir,
             "actor_rollout_ref.megatron.tensor_model_parallel_size": 2}
    out = run_distributed(_weights_after_setup, 2, tp=2,
                          args=(overrides_for(assets, str(tmp_path / "run"), True, **extra), hf_dir), timeout_s=600)
    for rank in out:
        assert rank["actor"] and rank["critic_trunk"] and rank["critic_norm"]
        assert rank["head_zero"]  # an untrained discriminator scores every sequence alike


def test_standard_ppo_with_adaptive_kl_in_reward(assets, tmp_path) -> None:
    """``algorithm.use_kl_in_reward``: a reference model is built, the penalty and its coefficient
    are reported, and the adaptive controller moves the coefficient (step 1's KL is exactly 0,
    the policy still being the reference, so the coefficient shrinks by the clipped 20% rate)."""
    out = str(tmp_path / "run")
    extra = {"actor_rollout_ref.rollout.n": 1, "algorithm.adv_estimator": "gae", "algorithm.use_kl_in_reward": True,
             "algorithm.kl_penalty": "low_var_kl", "algorithm.kl_ctrl.type": "adaptive",
             "algorithm.kl_ctrl.kl_coef": 0.1, "algorithm.kl_ctrl.horizon": 40, "algorithm.kl_ctrl.target_kl": 0.01,
             # The value model starts from a zero head and the demo reward is mostly 0, so every
             # advantage can be 0: the entropy bonus makes sure the actor moves.
             "actor_rollout_ref.actor.entropy_coeff": 0.01}
    run_distributed(train, 1, args=("ppo.yaml", overrides_for(assets, out, False, **extra)), timeout_s=600)
    rows = read_metrics(out)
    coefs = [r["actor/reward_kl_penalty_coeff"] for r in rows]
    assert rows[0]["actor/reward_kl_penalty"] == 0.0
    assert coefs[0] == 0.1 and coefs[1] == pytest.approx(0.1 * (1 - 0.2 * 4 / 40))
    assert rows[-1]["actor/reward_kl_penalty"] > 0.0  # the actor has moved away from the reference
    assert all(math.isfinite(r["critic/vf_loss"]) and math.isfinite(r["actor/pg_loss"]) for r in rows)


def _export_matches_the_actor(overrides: list[str]) -> dict:
    """Per rank: train, then compare the exported HF directory with the actor's own weights."""
    from safetensors.torch import load_file

    from megatron_gad.config import load_config
    from megatron_gad.models.hf_mapping import megatron_to_hf_tensors
    from megatron_gad.models.sharding import full_tensors
    from megatron_gad.trainer import Trainer

    cfg = load_config(os.path.join(CONFIGS, "gad_gspo.yaml"), overrides)
    trainer = Trainer(cfg)
    trainer.fit()
    expected = {}
    for name, full in full_tensors(trainer.parts.actor.chunks[0]):
        expected.update(megatron_to_hf_tensors(name, full, trainer.parts.actor_hf_config, "actor"))
    export_dir = os.path.join(cfg.trainer.default_local_dir, "actor_hf")
    files = [f for f in os.listdir(export_dir) if f.endswith(".safetensors")]
    exported = {k: v for f in files for k, v in load_file(os.path.join(export_dir, f)).items()}
    same = set(exported) == set(expected) and all(torch.equal(exported[k], expected[k]) for k in expected)
    return {"same": same, "files": sorted(os.listdir(export_dir))}


def test_gad_warmups_validation_diagnostics_and_export(assets, tmp_path) -> None:
    """Generator warmup (SFT) -> critic warmup -> GAD, visible per step; teacher-forced validation;
    the exported HF actor equals the trained actor and loads in transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "run")
    extra = {"trainer.generator_warmup_steps": 1, "trainer.critic_warmup": 1, "trainer.test_freq": 3,
             "trainer.val_before_train": True, "trainer.teacher_forced_validation": True, "trainer.export_hf": True,
             "data.val_batch_size": 100}
    result = run_distributed(_export_matches_the_actor, 1, args=(overrides_for(assets, out, True, **extra),),
                             timeout_s=600)[0]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    phases = [(r.get("trainer/generator_warmup"), r.get("trainer/actor_updated")) for r in rows[1:]]
    assert phases == [(1.0, 0.0), (0.0, 0.0), (0.0, 1.0)]
    assert "actor/sft_loss" in rows[1] and "actor/pg_loss" not in rows[2] and "actor/pg_loss" in rows[3]
    assert all("critic/d_loss" in r for r in rows[1:])
    before, after = rows[0]["val/teacher_log_prob"], rows[3]["val/teacher_log_prob"]
    assert before < 0 and after < 0 and after != before
    for suffix in ("", "_sampled"):  # the demo task's checker, on greedy and on sampled answers
        one_style, valid, correct = (rows[3][f"val/checker_{n}{suffix}"] for n in ("one_style", "valid", "correct"))
        assert 0.0 <= correct <= valid <= one_style <= 1.0
    assert result["same"], "the exported actor differs from the trained one"
    assert "config.json" in result["files"] and "tokenizer.json" in result["files"]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor_hf"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "actor_hf"))
    ids = tokenizer("1 + 2 =", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def _diagnostic_step(overrides: list[str]) -> dict:
    from megatron_gad.config import load_config
    from megatron_gad.trainer import Trainer

    trainer = Trainer(load_config(os.path.join(CONFIGS, "gad_gspo.yaml"), overrides))
    return trainer.train_step(trainer.parts.loader.next_batch())


def test_teacher_forced_diagnostic_feeds_grpo_known_ranks(assets, tmp_path) -> None:
    """``critic.teacher_repeat = n``: the j-th teacher copy of each prompt is valued j (no forward
    pass), GRPO sees those values, and the discriminator still trains on real passes."""
    extra = {"critic.teacher_repeat": 2, "actor_rollout_ref.rollout.n": 2}
    metrics = run_distributed(_diagnostic_step, 1, args=(overrides_for(assets, str(tmp_path / "run"), True, **extra),),
                              timeout_s=600)[0]
    assert metrics["critic/score_mean"] == 0.5  # mean of the synthetic values 0 and 1
    assert "critic/teacher_score_gt_student" not in metrics
    assert math.isfinite(metrics["critic/d_loss"]) and math.isfinite(metrics["actor/pg_loss"])


def _run_cli_expecting_exit_2(overrides: list[str]) -> str:
    proc = subprocess.run(pretrain_cli(overrides), env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


def test_non_finite_losses_skip_updates_and_stop_the_run(assets, tmp_path) -> None:
    """An absurd critic learning rate blows the discriminator up within its first updates: from
    then on its scores and losses are non-finite, the critic and actor updates are skipped and counted,
    and the run stops with exit 2 after the configured number in a row, the tripping step logged.
    (The head starts at zero, so the first update moves the head alone; at lr 1e30 the scores only
    saturate the loss, at 1e37 the head's next scores overflow.)"""
    out = str(tmp_path / "run")
    extra = {"critic.optim.lr": 1e37, "trainer.max_consecutive_nonfinite": 2, "trainer.total_training_steps": 5}
    last_line = _run_cli_expecting_exit_2(overrides_for(assets, out, True, **extra))
    assert last_line.startswith("error: 2 steps in a row had non-finite losses"), last_line
    rows = read_metrics(out)
    finite_steps = len(rows) - 2  # the blown-up critic overflows within a step or two
    assert 1 <= finite_steps <= 3 and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["trainer/nonfinite_steps_in_row"] for r in rows] == [0.0] * finite_steps + [1.0, 2.0]
    skipped = [r["critic/update_skipped"] for r in rows]
    # the first update is taken; the last finite step's gradient may already overflow (skipped)
    assert skipped[0] == 0.0 and skipped[-2:] == [1.0, 1.0] and set(skipped) <= {0.0, 1.0}


def test_diverged_actor_weights_stop_the_run_before_a_rollout(assets, tmp_path) -> None:
    """An absurd SFT learning rate makes the actor overflow within a few updates: the weight sync
    (inf/NaN weights) or the rollout (inf/NaN logits) of the next step stops the run with one
    line (exit 2) instead of sampling from garbage; the steps before it are logged."""
    import re

    out = str(tmp_path / "run")
    extra = {"trainer.generator_warmup_steps": 3, "trainer.generator_warmup_lr": 1e30}
    last_line = _run_cli_expecting_exit_2(overrides_for(assets, out, True, **extra))
    found = re.match(r"error: stopping at step (\d+): .*inf/NaN.*diverged", last_line)
    assert found and int(found.group(1)) in (2, 3), last_line
    assert [r["step"] for r in read_metrics(out)] == list(range(1, int(found.group(1))))
    # the same when the divergence is first met by the validation that follows a step
    extra["trainer.test_freq"] = 1
    last_line = _run_cli_expecting_exit_2(overrides_for(assets, str(tmp_path / "val"), True, **extra))
    assert re.match(r"error: stopping validating after step [12]: .*inf/NaN.*diverged", last_line), last_line


def _train_until_stopped(overrides: list[str]) -> str:
    """Per rank: train; return the TrainingStopped message (every rank must get one)."""
    from megatron_gad.trainer import TrainingStopped

    try:
        train("gad_gspo.yaml", overrides)
    except TrainingStopped as exc:
        return str(exc)
    return "not stopped"


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_divergence_stops_every_rank_of_a_parallel_run(assets, tmp_path, tp: int, pp: int) -> None:
    """Only some ranks see the bad weights or logits; all of them must stop (none left blocked in
    a collective), with the same step."""
    extra = {"actor_rollout_ref.megatron.tensor_model_parallel_size": tp,
             "actor_rollout_ref.megatron.pipeline_model_parallel_size": pp, "trainer.generator_warmup_steps": 3,
             "trainer.generator_warmup_lr": 1e30}
    messages = run_distributed(_train_until_stopped, 2, tp=tp, pp=pp,
                               args=(overrides_for(assets, str(tmp_path / "run"), True, **extra),), timeout_s=300)
    steps = {m.split(":")[0] for m in messages}
    assert len(steps) == 1 and steps.pop().startswith("stopping at step "), messages
