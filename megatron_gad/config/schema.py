"""The training config tree: one dataclass per section, in verl's section layout.

Root sections: ``data``, ``algorithm``, ``actor_rollout_ref`` (``model``, ``actor``, ``rollout``,
``ref``, ``megatron``), ``critic``, ``trainer``, ``custom_reward_function``. Every field carries a
docstring saying what it sets and what its default means. Sections owned by
components are the components' own dataclasses: ``data`` (:mod:`megatron_gad.data.config`),
``actor_rollout_ref.actor`` (:mod:`megatron_gad.engine.config`), ``actor_rollout_ref.rollout``
(:mod:`megatron_gad.rollout.base`), ``*.optim`` (:mod:`megatron_gad.models.build`). The sections
that gather several components (``critic``, ``trainer``, ...) are defined here.

Batch-size convention (verl's): ``data.train_batch_size`` and ``ppo_mini_batch_size`` count
PROMPTS; each prompt has ``rollout.n`` responses, so a mini-batch holds
``ppo_mini_batch_size * n`` sequences, split over the data-parallel ranks, each of which runs
micro-batches of ``ppo_micro_batch_size_per_gpu`` SEQUENCES.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_gad.data.config import DataConfig
from megatron_gad.engine.config import ActorConfig, CriticLossConfig, choices
from megatron_gad.losses import KL_KINDS, LOSS_AGG_MODES
from megatron_gad.models.build import OptimConfig
from megatron_gad.rollout.base import RolloutConfig

LOGGERS: tuple[str, ...] = ("console", "jsonl", "tensorboard", "wandb")
#: Signals ``trainer.save_on_signal`` accepts (megatron_gad.runtime.preemption).
STOP_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")

#: The keys accepted directly under ``actor_rollout_ref`` as well as in ``actor`` (verl's place);
#: :func:`megatron_gad.config.checks.merge_actor_keys` reconciles the two.
ACTOR_KEYS_AT_TOP: tuple[str, ...] = ("ppo_mini_batch_size", "ppo_micro_batch_size_per_gpu", "ppo_epochs")


@dataclass
class KLControlConfig:
    """``algorithm.kl_ctrl``: the coefficient of the in-reward KL penalty."""

    type: Literal["fixed", "adaptive"] = "fixed"
    """``fixed`` keeps ``kl_coef``; ``adaptive`` steers it towards ``target_kl``."""
    kl_coef: float = 0.001
    """Initial (or fixed) coefficient of the KL penalty subtracted from the reward."""
    horizon: int = 10000
    """Adaptive controller horizon, in sequences."""
    target_kl: float = 0.1
    """Adaptive controller target KL."""


@dataclass
class AlgorithmConfig:
    """``algorithm``: how rewards/scores become advantages."""

    adv_estimator: Literal["grpo", "gae"] = "grpo"
    """``grpo``: group-normalised scores within a prompt's n responses; ``gae``: value critic + GAE."""
    norm_adv_by_std_in_grpo: bool = True
    """GRPO divides by the group's (unbiased) std; false: only subtracts the group mean."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 1.0
    """GAE lambda."""
    use_kl_in_reward: bool = False
    """Subtract ``kl_ctrl.kl_coef * KL(actor || ref)`` from the token rewards."""
    kl_penalty: str = field(default="kl", metadata=choices(KL_KINDS))
    """Estimator of the in-reward KL penalty."""
    kl_ctrl: KLControlConfig = field(default_factory=KLControlConfig)
    """KL coefficient controller."""


@dataclass
class ModelConfig:
    """``*.model``: the Hugging Face model a role starts from."""

    path: str = ""
    """HF model directory (config.json + ``*.safetensors`` or ``pytorch_model*.bin``), or a
    Megatron checkpoint written by ``checkpoint_tools/hf_to_megatron.py`` for this role (loaded
    as is, no conversion at start). Critic: empty means the actor's path. A directory without
    weights is an error unless ``random_init``."""
    tokenizer_path: str | None = None
    """Tokenizer directory (None: ``path``). Actor and critic must share the tokenizer."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Parameter dtype: ``auto`` is bfloat16 on GPU and float32 on CPU."""
    random_init: bool = False
    """Start from megatron-core's random initialisation (only ``config.json`` is read from
    ``path``); never happens unless asked for here."""
    enable_gradient_checkpointing: bool = False
    """verl's key: recompute every transformer layer's activations in the backward pass
    (megatron-core's full, uniform activation recompute): less memory, one more forward."""


@dataclass
class MegatronConfig:
    """``*.megatron``: the Megatron parallel layout of a role."""

    tensor_model_parallel_size: int = 1
    """TP size; must divide the attention heads, the KV heads and 128 (the vocab pad multiple)."""
    pipeline_model_parallel_size: int = 1
    """PP size; must divide the number of layers."""

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where.<field>`` for a size < 1."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RefConfig:
    """``actor_rollout_ref.ref``: the frozen reference policy (same model and layout as the actor)."""

    log_prob_micro_batch_size_per_gpu: int | None = None
    """Sequences per micro-batch for reference log-probs (None: the actor's micro batch)."""


@dataclass
class ActorRolloutRefConfig:
    """``actor_rollout_ref``: the student policy, its rollout engine and its reference copy.

    ``ppo_mini_batch_size``, ``ppo_micro_batch_size_per_gpu`` and ``ppo_epochs`` may be given here
    or under ``actor`` (verl's place). A value from the command line beats
    one from YAML; between two places in the same source, THIS place wins (no silent mix: a
    conflict with different values is an error). After loading both places hold the value in force.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The student model."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Policy objective and optimizer."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation engine and sampling."""
    ref: RefConfig = field(default_factory=RefConfig)
    """Reference policy (for KL terms)."""
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    """Parallel layout of the actor (the reference model shares it)."""
    ppo_mini_batch_size: int | None = None
    """Same as ``actor.ppo_mini_batch_size`` (PROMPTS per optimizer step)."""
    ppo_micro_batch_size_per_gpu: int | None = None
    """Same as ``actor.ppo_micro_batch_size_per_gpu`` (SEQUENCES per micro-batch)."""
    ppo_epochs: int | None = None
    """Same as ``actor.ppo_epochs``."""

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where.<key>`` for one of these batch keys below 1."""
        for key in ACTOR_KEYS_AT_TOP:
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{where}.{key} must be >= 1, got {value}")


@dataclass
class CriticConfig:
    """``critic``: the discriminator (GAD data) or value model (standard data)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Scalar-head model; an empty path starts it from the actor's model (the GAD recipe)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer of the critic."""
    ppo_epochs: int = 1
    """Passes over each step's batch."""
    ppo_mini_batch_size: int | None = None
    """PROMPTS per critic optimizer step (None: the actor's)."""
    ppo_micro_batch_size_per_gpu: int | None = None
    """SEQUENCES per critic micro-batch per rank (None: the actor's)."""
    cliprange_value: float = 0.5
    """Clip range of the value loss (standard mode)."""
    loss_agg_mode: str = field(default="token-mean", metadata=choices(LOSS_AGG_MODES))
    """Aggregation of the value loss (standard mode)."""
    teacher_repeat: int = 0
    """Teacher-forced diagnostic: k > 0 gives the j-th of k teacher copies the synthetic value j."""
    megatron: MegatronConfig | None = None
    """Parallel layout of the critic (None: the actor's)."""

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where.<field>`` for an invalid count or clip range: the
        engine's own rules (:meth:`CriticLossConfig.validate`) plus ``teacher_repeat``."""
        micro = self.ppo_micro_batch_size_per_gpu  # None until load_config resolves it (the actor's)
        CriticLossConfig(ppo_epochs=self.ppo_epochs, cliprange_value=self.cliprange_value,
                         loss_agg_mode=self.loss_agg_mode,
                         **({} if micro is None else {"ppo_micro_batch_size_per_gpu": micro})).validate(where)
        if self.teacher_repeat < 0:
            raise ValueError(f"{where}.teacher_repeat must be >= 0, got {self.teacher_repeat}")

    def loss_settings(self) -> CriticLossConfig:
        """The fields the critic engine reads, as its own config (after :func:`load_config`)."""
        assert self.ppo_micro_batch_size_per_gpu is not None, "resolved by load_config"
        return CriticLossConfig(ppo_epochs=self.ppo_epochs, ppo_micro_batch_size_per_gpu=self.ppo_micro_batch_size_per_gpu,
                                cliprange_value=self.cliprange_value, loss_agg_mode=self.loss_agg_mode)


@dataclass
class TrainerConfig:
    """``trainer``: run length, warmups, checkpoints, logging."""

    total_epochs: int = 1
    """Passes over the training prompts."""
    total_training_steps: int | None = None
    """Cap on the number of steps (None: ``total_epochs`` decides)."""
    critic_warmup: int = 0
    """Critic-only steps after the generator warmup (none: right after it); the actor's policy
    update starts at step ``generator warmup steps + critic_warmup``."""
    generator_warmup_steps: int = 0
    """Steps of generator SFT on teacher responses (critic trained alongside) before GAD."""
    generator_warmup_epochs: int = 0
    """Generator warmup in epochs over the training prompts (exclusive with ``..._steps``)."""
    generator_warmup_lr: float | None = None
    """Actor learning rate during the generator warmup (SFT); None: ``actor.optim.lr``."""
    save_freq: int = -1
    """Checkpoint every this many steps (-1: only at the end)."""
    test_freq: int = -1
    """Validate every this many steps (-1: never during training)."""
    val_before_train: bool = True
    """Validate once before the first step (when ``data.val_files`` is set)."""
    default_local_dir: str = ""
    """Run directory (metrics.jsonl, checkpoints); empty: checkpoints/<project>/<experiment>."""
    resume_mode: str = "auto"
    """``auto`` (latest checkpoint in default_local_dir, if any), ``disable``, or a checkpoint path."""
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"], metadata=choices(LOGGERS))
    """Metric sinks; metrics.jsonl is always written."""
    project_name: str = "megatron_gad"
    """Project name (W&B project, default run directory)."""
    experiment_name: str = "gad_gspo"
    """Run name (W&B run, default run directory)."""
    seed: int = 1
    """Seed of data order, sampling and initialisation."""
    max_consecutive_nonfinite: int = 3
    """Stop after this many steps in a row with a non-finite loss (their updates are skipped)."""
    teacher_forced_validation: bool = False
    """GAD data: also report ``val/teacher_log_prob``, the actor's mean log-probability per
    teacher response token on the validation prompts (temperature 1)."""
    export_hf: bool = True
    """Export the trained actor as an HF directory (<default_local_dir>/actor_hf) at the end."""
    log_val_generations: int = 0
    """verl's key: at every validation, the first N prompts with their greedy response and score
    go to the console and to ``<default_local_dir>/val_generations.jsonl`` (0: none)."""
    print_config: bool = False
    """Print the whole resolved config at start-up (it is always saved as ``config.yaml``)."""
    max_ckpt_to_keep: int | None = None
    """Keep only the newest N complete checkpoints (older ones are deleted after a new one is
    complete and marked); None: keep all. verl's ``max_actor_ckpt_to_keep`` /
    ``max_critic_ckpt_to_keep`` set it (:data:`megatron_gad.config.verl_compat.RENAMED`)."""
    save_on_signal: list[str] = field(default_factory=lambda: ["SIGTERM"], metadata=choices(STOP_SIGNALS))
    """Signals that make every rank finish the step in flight, save a checkpoint and exit 0 (add
    SIGUSR1 for SLURM's ``--signal``); [] keeps the default action (exit without saving)."""

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where.<field>`` for an invalid count."""
        if self.total_epochs < 1:
            raise ValueError(f"{where}.total_epochs must be >= 1, got {self.total_epochs}")
        for name in ("critic_warmup", "generator_warmup_steps", "generator_warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        if self.generator_warmup_steps and self.generator_warmup_epochs:
            raise ValueError(f"{where}: set generator_warmup_steps or generator_warmup_epochs, not both")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"{where}.max_consecutive_nonfinite must be >= 1")
        if self.log_val_generations < 0:
            raise ValueError(f"{where}.log_val_generations must be >= 0, got {self.log_val_generations}")
        if self.max_ckpt_to_keep is not None and self.max_ckpt_to_keep < 1:
            raise ValueError(f"{where}.max_ckpt_to_keep must be >= 1 (or unset to keep every checkpoint), "
                             f"got {self.max_ckpt_to_keep}")


@dataclass
class RewardFunctionConfig:
    """``custom_reward_function``: the reward of standard (non-GAD) data."""

    path: str | None = None
    """Python file defining the function. Required for standard data (rows without
    ``teacher_response``). With GAD data it is optional and only feeds ``val/reward``; the demo
    task's own data then uses its built-in exact-match reward."""
    name: str = "compute_score"
    """Function name in that file: ``(data_source, solution_str, ground_truth, extra_info) -> float``."""


@dataclass
class TrainConfig:
    """The whole run: every section of the config tree."""

    data: DataConfig = field(default_factory=DataConfig)
    """Prompts, teacher responses and their tokenization."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantage estimation."""
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    """Student policy, rollout engine, reference policy."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """Discriminator (GAD) or value model (standard PPO)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Run length, warmups, checkpoints, logging."""
    custom_reward_function: RewardFunctionConfig = field(default_factory=RewardFunctionConfig)
    """Reward of standard (non-GAD) data."""
