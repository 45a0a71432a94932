"""The training loop: GAD + GSPO, GAD + PPO, standard PPO (value critic + GAE), pure GSPO.

Every rank runs the same loop (SPMD). Per step::

    prompts -> rollout n responses -> Megatron log-prob recompute (+ reference) -> critic scores
    (GAD: student and teacher) or rewards (reward function) -> advantages (GRPO or GAE) ->
    critic update -> actor update once step >= trainer.critic_warmup -> weight sync to the engine

The mode (GAD or standard) is decided once, by the dataset. Prompts are split over data-parallel
replicas; each replica's first rank (TP 0, PP 0) owns a rollout engine and shares its output with
the rest of its model-parallel group.
"""

from __future__ import annotations

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
from megatron_gad.engine import PairBatch, PolicyBatch, SequenceBatch, SftBatch, ValueBatch, local_mini_batch_size
from megatron_gad.experience import Experience, KLController, compute_advantages, join, teacher_forced_scores
from megatron_gad.losses import discriminator_accuracy, kl_penalty
from megatron_gad.metrics import MetricsLogger, Timer, throughput_metrics
from megatron_gad.models.build import set_lr, warmup_lr
from megatron_gad.rewards import load_reward_fn, score_responses
from megatron_gad.rollout.base import ModelDivergedError, logprob_agreement
from megatron_gad.rollout.weight_export import sync_weights
from megatron_gad.trainer_setup import Components, build_components

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training stopped early (for example too many non-finite losses in a row)."""


def teacher_sequences(batch: PromptBatch) -> SequenceBatch:
    """The teacher response of each row's prompt as model input (GAD data only)."""
    return SequenceBatch(batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_position_ids,
                         batch.teacher_response_mask)


def sft_batch(teacher: SequenceBatch) -> SftBatch:
    """Teacher-forced SFT on the teacher responses: the loss covers the response tokens only."""
    prompt = torch.zeros(teacher.rows, teacher.prompt_length, dtype=teacher.response_mask.dtype)
    loss_mask = torch.cat([prompt, teacher.response_mask], dim=1)
    return SftBatch(teacher.input_ids, teacher.attention_mask, teacher.position_ids, loss_mask)


def extra_infos(batch: PromptBatch) -> list[dict | None]:
    """Each row's ``extra_info`` column (None where the data has none): the ``extra_info``
    argument of a reward function, as verl passes it."""
    return list(batch.extra.get("extra_info", [None] * len(batch)))


def token_agreement(student: SequenceBatch, batch: PromptBatch) -> tuple[float, float]:
    """(teacher response tokens the student reproduced at the same position, teacher response
    tokens): a graded measure of agreement with the teacher on held-out prompts."""
    teacher, teacher_mask = batch.teacher_response_ids, batch.teacher_response_mask.bool()
    width = min(teacher.shape[1], student.responses.shape[1])
    same = (student.responses[:, :width] == teacher[:, :width]) & student.response_mask[:, :width].bool()
    return float((same & teacher_mask[:, :width]).sum()), float(teacher_mask.sum())


class Trainer:
    """Owns the components of a run and drives :meth:`fit`. Construct on every rank."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.c: Components = build_components(cfg)
        self.reward_fn = None
        reward = cfg.custom_reward_function
        if reward.path or (self.c.demo_data and self.c.has_ground_truth):  # demo: exact match by default
            self.reward_fn = load_reward_fn(reward.path, reward.name)
        self.step = 0
        self.nonfinite_in_row = 0
        self.weights_stale = True
        kl = cfg.algorithm.kl_ctrl
        self.kl_ctrl = KLController(kl.kl_coef, kl.type == "adaptive", kl.target_kl, kl.horizon)
        self._resume()
        if self.c.info.rank == 0:
            save_resolved(cfg, os.path.join(cfg.trainer.default_local_dir, "config.yaml"))
        self.validate_first = self.step == 0 and self.c.val_loader is not None and cfg.trainer.val_before_train
        self.metrics = MetricsLogger(cfg.trainer.default_local_dir, cfg.trainer.logger, cfg.trainer.project_name,
                                     cfg.trainer.experiment_name, total_steps=self.c.total_steps + self.validate_first,
                                     resume_step=self.step + 1 if self.step else 0)

    # ------------------------------------------------------------------------------ set-up
    def _roles(self) -> dict[str, tuple]:
        roles = {"actor": (self.c.actor.chunks, self.c.actor.optimizer)}
        if self.c.critic is not None:
            roles["critic"] = (self.c.critic.chunks, self.c.critic.optimizer)
        return roles

    def _resume(self) -> None:
        root = self.cfg.trainer.default_local_dir
        if self.c.info.rank == 0:
            for path in ckpt.clean_incomplete(root):
                logger.warning("removed incomplete checkpoint %s", path)
        dist.barrier()
        path = ckpt.resolve_resume(root, self.cfg.trainer.resume_mode)
        if path is None:
            return
        state = ckpt.load_training_checkpoint(path, self._roles())
        self.step = int(state["step"])
        self.c.loader.load_state_dict(state["data"])
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.kl_ctrl.coef = float(state.get("kl_coef", self.kl_ctrl.coef))
        self._log0(f"resumed from {path} at step {self.step}")

    def _log0(self, text: str) -> None:
        if self.c.info.rank == 0:
            print(f"[megatron_gad] {text}", flush=True)

    # ------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train until ``total_steps``; validate, save and export as configured. Returns the last
        step's metrics (identical on every rank)."""
        cfg, last = self.cfg.trainer, {}
        if self.validate_first:  # logged as step 0: the model before any update
            self.metrics.log(0, self.validate())
        while self.step < self.c.total_steps:
            batch = self.c.loader.next_batch()
            last = self.train_step(batch)
            self.step += 1
            if self.c.val_loader is not None and cfg.test_freq > 0 and (
                self.step % cfg.test_freq == 0 or self.step == self.c.total_steps
            ):
                last.update(self.validate())
            self.metrics.log(self.step, last)
            self._stop_if_nonfinite()
            last_step = self.step == self.c.total_steps
            if (cfg.save_freq > 0 and self.step % cfg.save_freq == 0) or (cfg.save_freq != 0 and last_step):
                self.save()
        if cfg.export_hf and self.c.total_steps > 0:
            self.export_actor(os.path.join(cfg.default_local_dir, "actor_hf"))
        self.metrics.close()
        return last

    def save(self) -> str:
        """Checkpoint both roles, the data position and this rank's RNG (collective)."""
        state = {"step": self.step, "data": self.c.loader.state_dict(), "nonfinite_in_row": self.nonfinite_in_row,
                 "kl_coef": self.kl_ctrl.coef}
        return ckpt.save_training_checkpoint(self.cfg.trainer.default_local_dir, self.step, self._roles(), state)

    def export_actor(self, out_dir: str) -> None:
        """Write the trained actor as a Hugging Face directory (collective)."""
        from megatron_gad.export import export_hf_from_chunks

        finite = all(bool(torch.isfinite(p).all()) for p in self.c.actor.chunks[0].parameters())
        self._stop_together(None if finite else ModelDivergedError("the actor's weights hold inf/NaN"),
                            "before the HF export")
        dtype = self.c.actor.config.params_dtype
        export_hf_from_chunks(self.c.actor.chunks, self.c.actor_hf_config, out_dir, self.c.tokenizer_dir, dtype=dtype)
        self._log0(f"exported the actor to {out_dir}")

    # ------------------------------------------------------------------------------ one step
    def train_step(self, batch: PromptBatch) -> dict[str, float]:
        """Run one step on this rank's slice of the prompt batch; return the step's metrics."""
        cfg, timer = self.cfg, Timer()
        metrics: dict[str, float] = {}
        diverged = None
        try:
            with timer("weight_sync"):
                self._sync_weights()
            with timer("rollout"):
                rows = batch.repeat(self.c.rollout_n)
                exp = self._rollout(rows)
                self._release_rollout()
        except ModelDivergedError as exc:
            diverged = exc
        self._stop_together(diverged, f"at step {self.step + 1}")
        generator_warmup, actor_on = self.phase(self.step)
        on_policy = actor_on and self._strictly_on_policy(exp)
        with timer("old_log_prob"):
            self._recompute_log_probs(exp, metrics, actor=not on_policy)
        with timer("score"):
            self._score(exp, rows, metrics)
        with timer("advantages"):
            self._advantages(exp, metrics, adapt_kl=actor_on)
        self._set_learning_rates(generator_warmup)
        with timer("critic_update"):
            metrics.update(self._update_critic(exp))
        with timer("actor_update"):
            if generator_warmup:
                metrics.update(self.c.actor.sft_update(sft_batch(exp.teacher)))
                self.weights_stale = True
            elif actor_on:
                metrics.update(self._update_actor(exp, on_policy))
        metrics.update(timer.metrics())
        metrics["timing/step"] = sum(v for k, v in metrics.items() if k.startswith("timing/"))
        metrics.update(self._step_stats(exp, actor_on, generator_warmup, metrics))
        self._count_nonfinite(metrics)
        return metrics

    def phase(self, step: int) -> tuple[bool, bool]:
        """(generator warmup?, actor policy update?) at ``step``.

        Steps ``[0, G)`` with ``G = trainer.generator_warmup_steps`` (or
        ``generator_warmup_epochs`` epochs) fine-tune the actor on the
        teacher responses (SFT) while the discriminator trains; the next
        ``trainer.critic_warmup`` steps train the critic only; the actor's policy loss is used
        from step ``G + critic_warmup`` on. With ``G = 0`` this is the design's critic warmup:
        steps 0..critic_warmup-1 leave the actor untouched.
        """
        start = self.phase_start()
        return step < start - self.cfg.trainer.critic_warmup, step >= start

    def _set_learning_rates(self, generator_warmup: bool) -> None:
        """This step's learning rates: ``trainer.generator_warmup_lr`` for the SFT warmup, and each
        optimizer's linear ``lr_warmup_steps`` (the actor's counted from its first policy step)."""
        t, arr = self.cfg.trainer, self.cfg.actor_rollout_ref
        if self.c.critic is not None:
            set_lr(self.c.critic.optimizer, warmup_lr(self.cfg.critic.optim, self.step))
        if generator_warmup:
            set_lr(self.c.actor.optimizer, t.generator_warmup_lr or arr.actor.optim.lr)
        else:
            policy_start = self.step - self.phase_start()
            set_lr(self.c.actor.optimizer, warmup_lr(arr.actor.optim, max(policy_start, 0)))

    def phase_start(self) -> int:
        """The first step at which the actor's policy loss is used."""
        t = self.cfg.trainer
        return (t.generator_warmup_steps or t.generator_warmup_epochs * self.c.steps_per_epoch) + t.critic_warmup

    def _release_rollout(self) -> None:
        """Let the rollout engine free its accelerator memory while the models train."""
        if self.c.rollout is not None:
            self.c.rollout.sleep()

    def _sync_weights(self) -> None:
        if not self.weights_stale:
            return
        engine = self.c.rollout
        if engine is not None:
            engine.wake()
        sync_weights(self.c.exporter, engine)
        self.weights_stale = False

    def _rollout(self, rows: PromptBatch, greedy: bool = False) -> Experience:
        """Responses to ``rows`` from this replica's engine, shared with its model-parallel peers.
        A diverged policy raises ModelDivergedError on every rank of the replica."""
        out: Any = None
        if self.c.rollout is not None:
            seed = self.cfg.trainer.seed * 1_000_003 + self.step * 101 + self.c.info.dp_rank
            try:
                gen = self.c.rollout.generate(rows.input_ids[:: self.c.rollout_n] if not greedy else rows.input_ids,
                                              rows.attention_mask[:: self.c.rollout_n] if not greedy
                                              else rows.attention_mask,
                                              n=1 if greedy else self.c.rollout_n, greedy=greedy, seed=seed)
                out = (gen.responses, gen.response_mask, gen.rollout_log_probs)
            except ModelDivergedError as exc:  # the peers wait for this rank's broadcast: send them the error
                out = exc
        out = self.c.share_from_rollout_rank(out)
        if isinstance(out, ModelDivergedError):
            raise out
        student = join(rows.input_ids, rows.attention_mask, out[0], out[1])
        teacher = teacher_sequences(rows) if self.c.mode is Mode.GAD else None
        return Experience(student=student, group_index=rows.group_index, teacher=teacher, rollout_log_probs=out[2])

    def _strictly_on_policy(self, exp: Experience) -> bool:
        """One epoch over one mini-batch, and nothing needs the old log-probs before the update
        (no KL in the reward): the update's own forward then gives them (no separate pass)."""
        arr, alg = self.cfg.actor_rollout_ref, self.cfg.algorithm
        mini = self._local_mini_batch("actor_rollout_ref.actor", None)
        return arr.actor.ppo_epochs == 1 and mini == exp.student.rows and not alg.use_kl_in_reward

    def _recompute_log_probs(self, exp: Experience, metrics: dict[str, float], actor: bool = True) -> None:
        temperature = self.cfg.actor_rollout_ref.rollout.temperature
        arr = self.cfg.actor_rollout_ref
        if actor:
            exp.old_log_probs, entropy = self.c.actor.compute_log_probs(exp.student, temperature)
            self._log_prob_metrics(exp, entropy, metrics)
        if self.c.ref is not None:
            exp.ref_log_probs, _ = self.c.ref.compute_log_probs(
                exp.student, temperature, micro_batch_size=arr.ref.log_prob_micro_batch_size_per_gpu)

    def _log_prob_metrics(self, exp: Experience, entropy: torch.Tensor, metrics: dict[str, float]) -> None:
        """Rollout entropy and the rollout engine's agreement with the Megatron log-probs."""
        agreement = logprob_agreement(exp.rollout_log_probs, exp.old_log_probs, exp.student.response_mask)
        mask = exp.student.response_mask.double()
        diff = (exp.rollout_log_probs.double() - exp.old_log_probs.double()).abs()
        # token-weighted means over the whole (DP-split) batch
        totals = self.c.dp_sum(torch.stack([(entropy * mask).sum(), (diff * mask).sum(), mask.sum()]))
        tokens = totals[2].clamp(min=1)
        metrics["actor/entropy_rollout"] = float(totals[0] / tokens)
        metrics["rollout/logprob_abs_diff_mean"] = float(totals[1] / tokens)
        metrics["rollout/logprob_abs_diff_max"] = self.c.dp_max(agreement["rollout/logprob_abs_diff_max"])

    def _score(self, exp: Experience, rows: PromptBatch, metrics: dict[str, float]) -> None:
        if self.c.mode is Mode.GAD:
            repeat = self.cfg.critic.teacher_repeat
            if repeat > 0:
                # The design's teacher-forced diagnostic: the j-th copy of a prompt's teacher
                # response is valued j instead of by a forward pass, and GRPO runs on these known
                # rankings. The discriminator still trains on real forward passes.
                exp.teacher_scores = teacher_forced_scores(exp.group_index, repeat)
                exp.scores = exp.teacher_scores
            else:
                exp.scores = self.c.critic.compute_scores(exp.student)
                exp.teacher_scores = self.c.critic.compute_scores(exp.teacher)
                metrics["critic/teacher_score_gt_student"] = self.c.dp_mean(
                    float(discriminator_accuracy(exp.teacher_scores, exp.scores)))
        else:
            scores = None
            if self.c.rollout is not None:  # one call per replica, shared: rewards may be costly or random
                texts = self.c.decode(exp.student.responses, exp.student.response_mask)
                scores = score_responses(self.reward_fn, texts, rows.data_source, rows.ground_truth,
                                         extra_infos(rows))
            exp.scores = self.c.share_from_rollout_rank(scores)
        metrics["critic/score_mean"] = self.c.dp_mean(float(exp.scores.mean()))
        if self.cfg.algorithm.adv_estimator == "gae":
            exp.values = self.c.critic.compute_values(exp.student)

    def _advantages(self, exp: Experience, metrics: dict[str, float], adapt_kl: bool) -> None:
        alg = self.cfg.algorithm
        exp.advantages, exp.returns = compute_advantages(
            alg.adv_estimator, exp.scores, exp.group_index, exp.student.response_mask, values=exp.values,
            norm_by_std=alg.norm_adv_by_std_in_grpo, gamma=alg.gamma, lam=alg.lam,
            token_penalty=self._reward_kl_penalty(exp, metrics, adapt_kl), reduce=self.c.dp_sum,
        )

    def _reward_kl_penalty(self, exp: Experience, metrics: dict[str, float], adapt: bool) -> torch.Tensor | None:
        """``algorithm.use_kl_in_reward``: the per-token penalty ``coef * KL(actor || ref)`` on the
        rollout's tokens (old log-probs against the reference). With ``adapt`` (steps whose
        advantages train the actor, not the warmups) the adaptive coefficient follows the KL."""
        alg = self.cfg.algorithm
        if not alg.use_kl_in_reward:
            return None
        mask = exp.student.response_mask.float()
        kl = kl_penalty(exp.old_log_probs, exp.ref_log_probs, alg.kl_penalty) * mask
        mean_kl = self.c.dp_mean(float((kl.sum(-1) / mask.sum(-1).clamp(min=1)).mean()))
        penalty = self.kl_ctrl.coef * kl
        metrics["actor/reward_kl_penalty"] = mean_kl
        metrics["actor/reward_kl_penalty_coeff"] = self.kl_ctrl.coef
        if adapt:
            self.kl_ctrl.update(mean_kl, exp.student.rows * self.c.info.dp)
        return penalty

    def _update_critic(self, exp: Experience) -> dict[str, float]:
        if self.c.critic is None:
            return {}
        mini = self._local_mini_batch("critic", self.cfg.critic.ppo_mini_batch_size)
        if self.c.mode is Mode.GAD:
            return self.c.critic.update_discriminator(PairBatch(exp.student, exp.teacher), mini_batch_size=mini)
        return self.c.critic.update_values(ValueBatch(exp.student, exp.values, exp.returns), mini_batch_size=mini)

    def _local_mini_batch(self, where: str, prompts: int | None) -> int:
        prompts = prompts or self.cfg.actor_rollout_ref.actor.ppo_mini_batch_size
        return local_mini_batch_size(prompts, self.c.rollout_n, self.c.info.dp, where)

    def _update_actor(self, exp: Experience, on_policy: bool = False) -> dict[str, float]:
        self.weights_stale = True
        batch = PolicyBatch(exp.student, exp.old_log_probs, exp.advantages, exp.ref_log_probs)
        if on_policy:  # the old log-probs (and their metrics) come from the update's forward
            metrics, exp.old_log_probs, entropy = self.c.actor.update_on_policy(
                batch, temperature=self.cfg.actor_rollout_ref.rollout.temperature, shuffle_seed=self.step)
            self._log_prob_metrics(exp, entropy, metrics)
            return metrics
        mini = self._local_mini_batch("actor_rollout_ref.actor", None)
        return self.c.actor.update(batch, temperature=self.cfg.actor_rollout_ref.rollout.temperature,
                                   mini_batch_size=mini, shuffle_seed=self.step)

    def _step_stats(self, exp: Experience, actor_on: bool, warmup: bool, metrics: dict) -> dict[str, float]:
        lengths = exp.student.response_mask.float().sum(-1)
        tokens = int(self.c.dp_sum(exp.student.attention_mask.sum().reshape(1))[0])
        seconds = metrics["timing/step"]
        return {
            "trainer/actor_updated": float(actor_on),
            "trainer/generator_warmup": float(warmup),
            "response_length/mean": self.c.dp_mean(float(lengths.mean())),
            "response_length/max": self.c.dp_max(float(lengths.max())),
            **throughput_metrics(tokens, seconds, self.c.info.world_size),
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
        """Greedy responses to the held-out prompts: mean reward (exact match for the demo) and,
        on GAD data, the share of responses identical to the teacher's, the share of teacher
        response tokens reproduced (``val/teacher_token_agreement``) and, with
        ``trainer.teacher_forced_validation``, the actor's mean log-probability per teacher
        response token (``val/teacher_log_prob``, temperature 1)."""
        # reward, exact, matched tokens, teacher tokens, rows, teacher log-prob sum
        sums = torch.zeros(6, dtype=torch.float64)
        teacher_batches: list[PromptBatch] = []
        diverged = None
        try:
            if self.weights_stale:
                self._sync_weights()
            elif self.c.rollout is not None:
                self.c.rollout.wake()
            for batch in self.c.val_loader.batches():
                exp = self._rollout(batch, greedy=True)
                texts = self.c.decode(exp.student.responses, exp.student.response_mask)
                if self.reward_fn is not None:
                    sums[0] += float(score_responses(self.reward_fn, texts, batch.data_source, batch.ground_truth,
                                                     extra_infos(batch)).sum())
                if batch.teacher_response is not None:
                    sums[1] += sum(t.strip() == r.strip() for t, r in zip(texts, batch.teacher_response))
                    sums[2:4] += torch.tensor(token_agreement(exp.student, batch))
                    teacher_batches.append(batch)
                sums[4] += len(texts)
        except ModelDivergedError as exc:
            diverged = exc
        self._release_rollout()
        self._stop_together(diverged, f"validating after step {self.step}")
        if self.cfg.trainer.teacher_forced_validation:  # Megatron passes, with the engine asleep
            sums[5] = sum(self._teacher_log_prob_sum(batch) for batch in teacher_batches)
        totals = self.c.dp_sum(sums)
        out = {}
        if self.c.mode is Mode.GAD:
            out["val/teacher_exact_match"] = float(totals[1] / totals[4])
            out["val/teacher_token_agreement"] = float(totals[2] / totals[3].clamp(min=1))
            if self.cfg.trainer.teacher_forced_validation:
                out["val/teacher_log_prob"] = float(totals[5] / totals[3].clamp(min=1))
        if self.reward_fn is not None:
            out["val/reward"] = float(totals[0] / totals[4])
        return out


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
        log_probs, _ = self.c.actor.compute_log_probs(teacher, 1.0, micro_batch_size=micro)
        return float((log_probs * teacher.response_mask).sum())


def run(cfg: TrainConfig) -> dict[str, float]:
    """Build a trainer for ``cfg``, train, and tear the process groups down."""
    from megatron_gad.runtime import destroy_distributed

    start = time.time()
    try:
        trainer = Trainer(cfg)
        metrics = trainer.fit()
        trainer._log0(f"finished {trainer.step} steps in {time.time() - start:.0f}s")
        return metrics
    finally:
        destroy_distributed()
