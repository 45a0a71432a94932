"""The training loop: GAD + GSPO, GAD + PPO, standard PPO (value critic + GAE), pure GSPO.

Every rank runs the same loop (SPMD). Per step::

    weight sync to the rollout engine -> rollout n responses per prompt -> Megatron log-prob
    recompute (+ reference) -> discriminator scores of student and teacher responses (GAD data) or
    reward-function scores -> advantages (GRPO or GAE) -> critic update -> actor update

What the actor does depends on the step's :class:`Phase`: the first
``trainer.generator_warmup_steps`` (or ``generator_warmup_epochs`` epochs) steps fine-tune it on
the teacher responses (SFT), the next ``trainer.critic_warmup`` steps leave it untouched, and from
then on it takes the policy-loss update. The critic trains in every phase.

The data's mode (GAD or standard) is decided once, by the dataset, and the critic's role
(discriminator, value model, none) once, at set-up (:class:`CriticRole`). Prompts are split over
data-parallel replicas; each replica's first rank (TP 0, PP 0) owns a rollout engine and shares
its output with the rest of its model-parallel group.
"""

from __future__ import annotations

import enum
import gc
import logging
import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from megatron_gad import checkpoint as ckpt
from megatron_gad.config import TrainConfig, save_resolved
from megatron_gad.data.batch import Mode, PromptBatch
from megatron_gad.data.demo import TASK_STYLES
from megatron_gad.engine import PairBatch, PolicyBatch, SequenceBatch, SftBatch, ValueBatch, local_mini_batch_size
from megatron_gad.experience import Experience, KLController, compute_advantages, join, teacher_forced_scores
from megatron_gad.losses import discriminator_accuracy, kl_penalty
from megatron_gad.metrics import MetricsLogger, Timer, throughput_metrics
from megatron_gad.models.build import set_lr, warmup_lr
from megatron_gad.rewards import load_reward_fn, score_responses
from megatron_gad.rollout.base import ModelDivergedError
from megatron_gad.rollout.weight_export import sync_weights
from megatron_gad.run_dir import claim_run_dir
from megatron_gad.seeds import rollout_seed, validation_seed
from megatron_gad.trainer_setup import Components, CriticRole, build_components
from megatron_gad.validation import ValidationSums, log_val_generations, token_agreement, val_generation_rows

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    """What the actor does at a training step (the critic trains in every phase)."""

    GENERATOR_WARMUP = "generator_warmup"
    """SFT on the teacher responses (GAD data only)."""
    CRITIC_WARMUP = "critic_warmup"
    """No actor update: the critic alone trains."""
    POLICY = "policy"
    """The actor's policy-loss update on the step's advantages."""


class TrainingStopped(RuntimeError):
    """Training stopped early (for example too many non-finite losses in a row)."""


def step_phase(step: int, generator_warmup_end: int, policy_start: int) -> Phase:
    """The phase of the 0-based ``step``: the generator warmup for steps ``[0, generator_warmup_end)``,
    the critic warmup for ``[generator_warmup_end, policy_start)``, the policy phase from ``policy_start`` on."""
    if step < generator_warmup_end:
        return Phase.GENERATOR_WARMUP
    return Phase.CRITIC_WARMUP if step < policy_start else Phase.POLICY


def teacher_sequences(batch: PromptBatch) -> SequenceBatch:
    """The teacher response of each row's prompt as model input (GAD data only)."""
    return SequenceBatch(batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_position_ids,
                         batch.teacher_response_mask)


def sft_batch(teacher: SequenceBatch) -> SftBatch:
    """Teacher-forced SFT on the teacher responses: the loss covers the response tokens only."""
    prompt = torch.zeros(teacher.rows, teacher.prompt_length, dtype=teacher.response_mask.dtype)
    loss_mask = torch.cat([prompt, teacher.response_mask], dim=1)
    return SftBatch(teacher.input_ids, teacher.attention_mask, teacher.position_ids, loss_mask)


class Trainer:
    """Owns the components of a run and drives :meth:`fit`. Construct on every rank."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.run_lock, self.resume_path = claim_run_dir(cfg)  # before any model is built
        self.parts: Components = build_components(cfg)
        t = cfg.trainer
        #: Steps [0, generator_warmup_end) are the generator warmup; the policy phase starts at policy_start.
        self.generator_warmup_end = t.generator_warmup_steps or t.generator_warmup_epochs * self.parts.steps_per_epoch
        self.policy_start = self.generator_warmup_end + t.critic_warmup
        self.reward_fn = None
        reward = cfg.custom_reward_function
        if reward.path or (self.parts.demo_data and self.parts.has_ground_truth):  # demo: exact match by default
            self.reward_fn = load_reward_fn(reward.path, reward.name)
        self.step = 0
        self.nonfinite_in_row = 0
        self.weights_stale = True
        self.stopped_by: str | None = None
        kl = cfg.algorithm.kl_ctrl
        self.kl_ctrl = KLController(kl.kl_coef, kl.type == "adaptive", kl.target_kl, kl.horizon)
        self._resume()
        self.first_step = self.step  # where this process started (after a resume: the checkpoint's step)
        if self.parts.info.rank == 0:
            save_resolved(cfg, os.path.join(cfg.trainer.default_local_dir, "config.yaml"))
        self.validate_first = self.step == 0 and self.parts.val_loader is not None and cfg.trainer.val_before_train
        self.metrics = MetricsLogger(cfg.trainer.default_local_dir, cfg.trainer.logger, cfg.trainer.project_name,
                                     cfg.trainer.experiment_name, total_steps=self.parts.total_steps + self.validate_first,
                                     resume_step=self.step + 1 if self.step else 0)

    # ------------------------------------------------------------------------------ set-up
    def _roles(self) -> dict[str, tuple]:
        roles = {"actor": (self.parts.actor.chunks, self.parts.actor.optimizer)}
        if self.parts.critic is not None:
            roles["critic"] = (self.parts.critic.chunks, self.parts.critic.optimizer)
        return roles

    def _resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        state = ckpt.load_training_checkpoint(path, self._roles())
        self.step = int(state["step"])
        self.parts.loader.load_state_dict(state["data"])
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.kl_ctrl.coef = float(state.get("kl_coef", self.kl_ctrl.coef))
        self._log0(f"resumed from {path} at step {self.step}")

    def _log0(self, text: str) -> None:
        if self.parts.info.rank == 0:
            print(f"[megatron_gad] {text}", flush=True)

    # ------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train until ``total_steps``; validate, save and export as configured. Returns the last
        step's metrics (identical on every rank). A ``trainer.save_on_signal`` signal on any rank
        during the loop stops every rank at the next step boundary with a checkpoint of that step
        (``stopped_by`` names it; no export)."""
        from megatron_gad.runtime.preemption import StopOnSignal

        cfg, last = self.cfg.trainer, {}
        stop = StopOnSignal(cfg.save_on_signal)
        try:
            last = self._loop(stop)
        finally:
            stop.restore()
        if cfg.export_hf and self.parts.total_steps > 0 and self.stopped_by is None:
            self.export_actor(os.path.join(cfg.default_local_dir, "actor_hf"))
        self.metrics.close()
        if self.run_lock is not None:
            self.run_lock.release()
        return last

    def _loop(self, stop: Any) -> dict[str, float]:
        cfg, last = self.cfg.trainer, {}
        if self.validate_first:  # logged as step 0: the model before any update
            self.metrics.log(0, self.validate())
        while self.step < self.parts.total_steps:
            batch = self.parts.loader.next_batch()
            last = self.train_step(batch)
            self.step += 1
            if self.parts.val_loader is not None and cfg.test_freq > 0 and (
                self.step % cfg.test_freq == 0 or self.step == self.parts.total_steps
            ):
                last.update(self.validate())
            self.metrics.log(self.step, last)
            self._stop_if_nonfinite()
            last_step = self.step == self.parts.total_steps
            due = (cfg.save_freq > 0 and self.step % cfg.save_freq == 0) or (cfg.save_freq != 0 and last_step)
            saved = self.save() if due else None
            self.stopped_by = stop.agreed()  # collective: any rank's signal stops every rank here
            if self.stopped_by is not None:
                path = saved or self.save()
                self._log0(f"stopping after step {self.step} ({self.stopped_by}): saved {path}; "
                           f"run the same command to resume")
                break
        return last

    def save(self) -> str:
        """Checkpoint both roles, the data position and this rank's RNG (collective)."""
        state = {"step": self.step, "data": self.parts.loader.state_dict(), "nonfinite_in_row": self.nonfinite_in_row,
                 "kl_coef": self.kl_ctrl.coef}
        return ckpt.save_training_checkpoint(self.cfg.trainer.default_local_dir, self.step, self._roles(), state,
                                             keep=self.cfg.trainer.max_ckpt_to_keep)

    def export_actor(self, out_dir: str) -> None:
        """Write the trained actor as a Hugging Face directory (collective)."""
        from megatron_gad.export import export_hf_from_chunks

        finite = all(bool(torch.isfinite(p).all()) for p in self.parts.actor.chunks[0].parameters())
        self._stop_together(None if finite else ModelDivergedError("the actor's weights hold inf/NaN"),
                            "before the HF export")
        dtype = self.parts.actor.config.params_dtype
        export_hf_from_chunks(self.parts.actor.chunks, self.parts.actor_hf_config, out_dir, self.parts.tokenizer_dir, dtype=dtype)
        self._log0(f"exported the actor to {out_dir}")

    # ------------------------------------------------------------------------------ one step
    def train_step(self, batch: PromptBatch) -> dict[str, float]:
        """Run one step on this rank's slice of the prompt batch; return the step's metrics."""
        timer = Timer()
        metrics: dict[str, float] = {}
        diverged = None
        try:
            with timer("weight_sync"):
                self._sync_weights()
            with timer("rollout"):
                rows, exp = self._rollout(batch, self.cfg.actor_rollout_ref.rollout.n)
                self._release_rollout()
        except ModelDivergedError as exc:
            diverged = exc
        self._stop_together(diverged, f"at step {self.step + 1}")
        phase = self.phase(self.step)
        on_policy = phase is Phase.POLICY and self._strictly_on_policy(exp)
        with timer("old_log_prob"):
            self._recompute_log_probs(exp, metrics, actor=not on_policy)
        with timer("score"):
            self._score(exp, rows, metrics)
        with timer("advantages"):
            self._advantages(exp, metrics, phase)
        self._set_learning_rates(phase)
        with timer("critic_update"):
            metrics.update(self._update_critic(exp))
        with timer("actor_update"):
            if phase is Phase.GENERATOR_WARMUP:
                metrics.update(self.parts.actor.sft_update(sft_batch(exp.teacher)))
                self.weights_stale = True
            elif phase is Phase.POLICY:
                metrics.update(self._update_actor(exp, on_policy))
        metrics.update(timer.metrics())
        metrics["timing/step"] = sum(v for k, v in metrics.items() if k.startswith("timing/"))
        metrics.update(self._step_stats(exp, phase, metrics))
        self._count_nonfinite(metrics)
        return metrics

    def phase(self, step: int) -> Phase:
        """The phase of ``step`` (0-based); see :func:`step_phase`."""
        return step_phase(step, self.generator_warmup_end, self.policy_start)

    def _set_learning_rates(self, phase: Phase) -> None:
        """This step's learning rates: ``trainer.generator_warmup_lr`` for the SFT warmup, and each
        optimizer's linear ``lr_warmup_steps`` (the actor's counted from its first policy step)."""
        actor_optim = self.cfg.actor_rollout_ref.actor.optim
        if self.parts.critic is not None:
            set_lr(self.parts.critic.optimizer, warmup_lr(self.cfg.critic.optim, self.step, self.parts.total_steps))
        if phase is Phase.GENERATOR_WARMUP:
            set_lr(self.parts.actor.optimizer, self.cfg.trainer.generator_warmup_lr or actor_optim.lr)
        else:
            set_lr(self.parts.actor.optimizer, warmup_lr(actor_optim, max(self.step - self.policy_start, 0),
                                                     self.parts.total_steps))

    def _release_rollout(self) -> None:
        """Let the rollout engine free its accelerator memory while the models train."""
        if self.parts.rollout_engine is not None:
            self.parts.rollout_engine.sleep()

    def _sync_weights(self) -> None:
        if not self.weights_stale:
            return
        # The engine's load_weights wakes what it needs in order (vLLM: the weights, then the KV
        # cache once they are loaded), so the two are never resident beside the buckets at once.
        sync_weights(self.parts.exporter, self.parts.rollout_engine)
        self.weights_stale = False

    def _rollout(self, prompts: PromptBatch, n: int, greedy: bool = False,
                 seed: int | None = None) -> tuple[PromptBatch, Experience]:
        """``n`` responses to each of ``prompts`` from this replica's rollout engine, shared with its
        model-parallel peers: (the prompts repeated to one row per response, the experience).
        ``seed``: the sampler's (default: this step's training rollout seed, :mod:`megatron_gad.seeds`).
        A diverged policy raises ModelDivergedError on every rank of the replica."""
        out: Any = None
        if self.parts.rollout_engine is not None:
            if seed is None:
                seed = rollout_seed(self.cfg.trainer.seed, self.step, self.parts.info.dp_rank)
            try:
                gen = self.parts.rollout_engine.generate(prompts.input_ids, prompts.attention_mask, n=n, greedy=greedy,
                                                     seed=seed)
                out = (gen.responses, gen.response_mask, gen.rollout_log_probs)
            except ModelDivergedError as exc:  # the peers wait for this rank's broadcast: send them the error
                out = exc
        out = self.parts.share_from_rollout_rank(out)
        if isinstance(out, ModelDivergedError):
            raise out
        rows = prompts.repeat(n) if n > 1 else prompts
        student = join(rows.input_ids, rows.attention_mask, out[0], out[1])
        teacher = teacher_sequences(rows) if self.parts.mode is Mode.GAD else None
        return rows, Experience(student=student, group_index=rows.group_index, teacher=teacher,
                                rollout_log_probs=out[2])

    def _strictly_on_policy(self, exp: Experience) -> bool:
        """One epoch over one mini-batch, and nothing needs the old log-probs before the update
        (no KL in the reward): the update's own forward then gives them (no separate pass)."""
        actor_rollout, alg = self.cfg.actor_rollout_ref, self.cfg.algorithm
        mini = self._local_mini_batch("actor_rollout_ref.actor", None)
        return actor_rollout.actor.ppo_epochs == 1 and mini == exp.student.rows and not alg.use_kl_in_reward

    def _recompute_log_probs(self, exp: Experience, metrics: dict[str, float], actor: bool = True) -> None:
        temperature = self.cfg.actor_rollout_ref.rollout.temperature
        actor_rollout = self.cfg.actor_rollout_ref
        if actor:
            exp.old_log_probs, entropy = self.parts.actor.compute_log_probs(
                exp.student, temperature, micro_batch_size=actor_rollout.rollout.log_prob_micro_batch_size_per_gpu)
            self._log_prob_metrics(exp, entropy, metrics)
        if self.parts.ref is not None:
            exp.ref_log_probs, _ = self.parts.ref.compute_log_probs(
                exp.student, temperature, micro_batch_size=actor_rollout.ref.log_prob_micro_batch_size_per_gpu)

    def _log_prob_metrics(self, exp: Experience, entropy: torch.Tensor, metrics: dict[str, float]) -> None:
        """Rollout entropy and the rollout engine's agreement with the Megatron log-probs."""
        mask = exp.student.response_mask.double()
        diff = (exp.rollout_log_probs.double() - exp.old_log_probs.double()).abs()
        # token-weighted means over the whole (DP-split) batch; the max over its valid tokens
        totals = self.parts.dp_sum(torch.stack([(entropy * mask).sum(), (diff * mask).sum(), mask.sum()]))
        tokens = totals[2].clamp(min=1)
        valid_diff = diff[exp.student.response_mask.bool()]
        metrics["actor/entropy_rollout"] = float(totals[0] / tokens)
        metrics["rollout/logprob_abs_diff_mean"] = float(totals[1] / tokens)
        metrics["rollout/logprob_abs_diff_max"] = self.parts.dp_max(float(valid_diff.max()) if valid_diff.numel() else 0.0)

    def _score(self, exp: Experience, rows: PromptBatch, metrics: dict[str, float]) -> None:
        """The step's scores: the discriminator's (GAD data) or the reward function's, and the
        value model's values when the critic is one (``rows``: one per response)."""
        role = self.parts.critic_role
        if role is CriticRole.DISCRIMINATOR:
            repeat = self.cfg.critic.teacher_repeat
            if repeat > 0:
                # The teacher-forced diagnostic (critic.teacher_repeat): the j-th copy of a
                # prompt's teacher response is valued j instead of by a forward pass, and GRPO
                # runs on these known rankings. The discriminator still trains on real passes.
                exp.teacher_scores = teacher_forced_scores(exp.group_index, repeat)
                exp.scores = exp.teacher_scores
            else:
                exp.scores = self.parts.critic.compute_scores(exp.student)
                exp.teacher_scores = self.parts.critic.compute_scores(exp.teacher)
                metrics["critic/teacher_score_gt_student"] = self.parts.dp_mean(
                    float(discriminator_accuracy(exp.teacher_scores, exp.scores)))
        else:
            scores = None
            if self.parts.rollout_engine is not None:  # one call per replica, shared: rewards may be costly or random
                texts = self.parts.decode(exp.student.responses, exp.student.response_mask)
                scores = score_responses(self.reward_fn, texts, rows.data_source, rows.ground_truth,
                                         rows.extra_infos())
            exp.scores = self.parts.share_from_rollout_rank(scores)
        metrics["critic/score_mean"] = self.parts.dp_mean(float(exp.scores.mean()))
        if role is CriticRole.VALUE:
            exp.values = self.parts.critic.compute_values(exp.student)

    def _advantages(self, exp: Experience, metrics: dict[str, float], phase: Phase) -> None:
        alg = self.cfg.algorithm
        exp.advantages, exp.returns = compute_advantages(
            alg.adv_estimator, exp.scores, exp.group_index, exp.student.response_mask, values=exp.values,
            norm_by_std=alg.norm_adv_by_std_in_grpo, gamma=alg.gamma, lam=alg.lam,
            token_penalty=self._reward_kl_penalty(exp, metrics, phase), reduce=self.parts.dp_sum,
        )

    def _reward_kl_penalty(self, exp: Experience, metrics: dict[str, float], phase: Phase) -> torch.Tensor | None:
        """``algorithm.use_kl_in_reward``: the per-token penalty ``coef * KL(actor || ref)`` on the
        rollout's tokens (old log-probs against the reference). In the policy phase (the steps
        whose advantages train the actor) the adaptive coefficient follows the KL."""
        alg = self.cfg.algorithm
        if not alg.use_kl_in_reward:
            return None
        mask = exp.student.response_mask.float()
        kl = kl_penalty(exp.old_log_probs, exp.ref_log_probs, alg.kl_penalty) * mask
        mean_kl = self.parts.dp_mean(float((kl.sum(-1) / mask.sum(-1).clamp(min=1)).mean()))
        penalty = self.kl_ctrl.coef * kl
        metrics["actor/reward_kl_penalty"] = mean_kl
        metrics["actor/reward_kl_penalty_coeff"] = self.kl_ctrl.coef
        if phase is Phase.POLICY:
            self.kl_ctrl.update(mean_kl, exp.student.rows * self.parts.info.dp)
        return penalty

    def _update_critic(self, exp: Experience) -> dict[str, float]:
        role = self.parts.critic_role
        if role is CriticRole.NONE:
            return {}
        mini = self._local_mini_batch("critic", self.cfg.critic.ppo_mini_batch_size)
        if role is CriticRole.DISCRIMINATOR:
            return self.parts.critic.update_discriminator(PairBatch(exp.student, exp.teacher), mini_batch_size=mini)
        return self.parts.critic.update_values(ValueBatch(exp.student, exp.values, exp.returns), mini_batch_size=mini)

    def _local_mini_batch(self, where: str, prompts: int | None) -> int:
        prompts = prompts or self.cfg.actor_rollout_ref.actor.ppo_mini_batch_size
        return local_mini_batch_size(prompts, self.cfg.actor_rollout_ref.rollout.n, self.parts.info.dp, where)

    def _update_actor(self, exp: Experience, on_policy: bool = False) -> dict[str, float]:
        self.weights_stale = True
        batch = PolicyBatch(exp.student, exp.old_log_probs, exp.advantages, exp.ref_log_probs)
        if on_policy:  # the old log-probs (and their metrics) come from the update's forward
            metrics, exp.old_log_probs, entropy = self.parts.actor.update_on_policy(
                batch, temperature=self.cfg.actor_rollout_ref.rollout.temperature, shuffle_seed=self.step)
            self._log_prob_metrics(exp, entropy, metrics)
            return metrics
        mini = self._local_mini_batch("actor_rollout_ref.actor", None)
        return self.parts.actor.update(batch, temperature=self.cfg.actor_rollout_ref.rollout.temperature,
                                   mini_batch_size=mini, shuffle_seed=self.step)

    def _step_stats(self, exp: Experience, phase: Phase, metrics: dict) -> dict[str, float]:
        lengths = exp.student.response_mask.float().sum(-1)
        tokens = int(self.parts.dp_sum(exp.student.attention_mask.sum().reshape(1))[0])
        seconds = metrics["timing/step"]
        return {
            "trainer/actor_updated": float(phase is Phase.POLICY),
            "trainer/generator_warmup": float(phase is Phase.GENERATOR_WARMUP),
            "response_length/mean": self.parts.dp_mean(float(lengths.mean())),
            "response_length/max": self.parts.dp_max(float(lengths.max())),
            **throughput_metrics(tokens, seconds, self.parts.info.world_size),
        }

    def _count_nonfinite(self, metrics: dict[str, float]) -> None:
        """Count steps in a row with a non-finite loss (their updates were skipped)."""
        losses = [v for k, v in metrics.items() if k.endswith("_loss") and isinstance(v, float)]
        self.nonfinite_in_row = 0 if all(math.isfinite(v) for v in losses) else self.nonfinite_in_row + 1
        metrics["trainer/nonfinite_steps_in_row"] = float(self.nonfinite_in_row)

    def _stop_if_nonfinite(self) -> None:
        limit = self.cfg.trainer.max_consecutive_nonfinite
        if self.nonfinite_in_row >= limit:
            raise TrainingStopped(f"{self.nonfinite_in_row} steps in a row had non-finite losses "
                                  f"(trainer.max_consecutive_nonfinite={limit}); stopping at step {self.step}")

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """One pass over the held-out prompts: greedy responses (and, on the demo tasks, one sample
        per prompt at the rollout temperature), then, with ``trainer.teacher_forced_validation``,
        the actor's log-probs of the teacher responses. Returns the ``val/*`` metrics defined in
        :mod:`megatron_gad.validation` (identical on every rank)."""
        sums = ValidationSums()
        gad = self.parts.mode is Mode.GAD
        teacher_batches: list[PromptBatch] = []
        diverged = None
        shown: list[dict] = []  # trainer.log_val_generations samples
        try:
            if self.weights_stale:
                self._sync_weights()
            elif self.parts.rollout_engine is not None:
                self.parts.rollout_engine.wake()
            for index, batch in enumerate(self.parts.val_loader.batches()):
                _, exp = self._rollout(batch, 1, greedy=True)
                texts = self.parts.decode(exp.student.responses, exp.student.response_mask)
                scores = None
                if self.reward_fn is not None:
                    scores = score_responses(self.reward_fn, texts, batch.data_source, batch.ground_truth,
                                             batch.extra_infos())
                    sums.add("reward", float(scores.sum()))
                shown += val_generation_rows(batch, texts, scores, self.cfg.trainer.log_val_generations - len(shown))
                if gad:
                    sums.add("exact", sum(t.strip() == r.strip() for t, r in zip(texts, batch.teacher_response)))
                    matched, teacher_tokens = token_agreement(exp.student, batch)
                    sums.add("matched_tokens", matched)
                    sums.add("teacher_tokens", teacher_tokens)
                    teacher_batches.append(batch)
                sums.add("rows", len(texts))
                sums.add_checks(batch, texts, sampled=False)
                if any(s in TASK_STYLES for s in batch.data_source):  # a demo task: its sampled answers too
                    seed = validation_seed(self.cfg.trainer.seed, self.step, index, self.parts.info.dp_rank)
                    _, sampled = self._rollout(batch, 1, seed=seed)
                    sums.add_checks(batch, self.parts.decode(sampled.student.responses, sampled.student.response_mask),
                                    sampled=True)
        except ModelDivergedError as exc:
            diverged = exc
        self._release_rollout()
        self._stop_together(diverged, f"validating after step {self.step}")
        if self.parts.info.rank == 0 and self.cfg.trainer.log_val_generations:
            log_val_generations(self.cfg.trainer.default_local_dir, self.step, shown)
        teacher_forced = self.cfg.trainer.teacher_forced_validation
        if teacher_forced:  # Megatron passes, with the engine asleep
            sums.add("teacher_log_prob", sum(self._teacher_log_prob_sum(batch) for batch in teacher_batches))
        return sums.metrics(self.parts.dp_sum, gad, teacher_forced, self.reward_fn is not None)

    def _stop_together(self, diverged: ModelDivergedError | None, when: str) -> None:
        """Collective over every rank: when any rank found the policy diverged, all of them raise
        TrainingStopped (none is left waiting in a collective for a peer that stopped)."""
        from megatron_gad.runtime.distributed import device

        flag = torch.tensor([0.0 if diverged is None else 1.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if float(flag[0]):
            detail = str(diverged) if diverged is not None else "another rank found the policy diverged (inf/NaN)"
            raise TrainingStopped(f"stopping {when}: {detail}") from diverged

    def _teacher_log_prob_sum(self, batch: PromptBatch) -> float:
        """Sum of the actor's log-probs (temperature 1) of the teacher response tokens of ``batch``
        (collective over the model-parallel group)."""
        teacher = teacher_sequences(batch)
        micro = math.gcd(teacher.rows, self.cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu)
        log_probs, _ = self.parts.actor.compute_log_probs(teacher, 1.0, micro_batch_size=micro)
        return float((log_probs * teacher.response_mask).sum())


def run(cfg: TrainConfig) -> dict[str, float]:
    """Build a trainer for ``cfg``, train, and tear the process groups down."""
    from megatron_gad.runtime import destroy_distributed

    start = time.time()
    try:
        trainer = Trainer(cfg)
        # The set-up's survivors (modules, models, data) live through training: frozen, no collection
        # during the steps scans them (the set-up's own garbage is collected first; thawed after).
        gc.collect()
        gc.freeze()
        metrics = trainer.fit()
        if trainer.stopped_by is None:
            resumed = f" (resumed at step {trainer.first_step}, now at {trainer.step})" if trainer.first_step else ""
            trainer._log0(f"finished {trainer.step - trainer.first_step} steps{resumed} in {time.time() - start:.0f}s")
        return metrics
    finally:
        gc.unfreeze()
        destroy_distributed()
