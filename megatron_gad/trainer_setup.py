"""Build everything a run needs from its config: data, process groups, training engines, the
rollout engine, the weight exporter.

Called on every rank by :class:`megatron_gad.trainer.Trainer`, with a config that
:func:`megatron_gad.config.load_config` has checked. The checks that need the data (its mode) and
the model directories run here, before any model is built (:func:`read_run_inputs`, which the
launcher's preflight also runs: ConfigError naming the key, or DataError naming the file and row).
"Training engine" means a role's Megatron model + optimizer (:mod:`megatron_gad.engine`); "rollout
engine" the generator (:mod:`megatron_gad.rollout`).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_gad.config import ConfigError, TrainConfig
from megatron_gad.data.batch import Mode, PromptBatch, PromptLoader
from megatron_gad.data.demo import DEMO_DATA_SOURCE
from megatron_gad.hf_io import ConversionError, read_hf_config
from megatron_gad.runtime import ParallelInfo, init_distributed


class CriticRole(enum.Enum):
    """What the critic model is in a run; decided once, by :meth:`decide`, at set-up."""

    DISCRIMINATOR = "discriminator"
    """GAD data: scores student and teacher responses; its scores are the rewards."""
    VALUE = "value"
    """Standard data with ``algorithm.adv_estimator=gae``: per-token values for GAE."""
    NONE = "none"
    """Standard data with GRPO: the reward function scores responses; no critic is built."""

    @classmethod
    def decide(cls, mode: Mode, adv_estimator: str) -> "CriticRole":
        """The role for data of ``mode`` and the advantage estimator ``adv_estimator``."""
        if mode is Mode.GAD:
            return cls.DISCRIMINATOR
        return cls.VALUE if adv_estimator == "gae" else cls.NONE


def dp_rows(size: int, dp: int, dp_rank: int, mini: int | None) -> list[int]:
    """The prompts of a global batch of ``size`` that data-parallel rank ``dp_rank`` handles.

    Training (``mini`` = prompts per mini-batch): for every mini-batch k the rank takes its
    share ``[k*mini + r*mini/dp, k*mini + (r+1)*mini/dp)``, so its k-th local mini-batch holds
    exactly global mini-batch k's prompts at every DP size. Validation (``mini`` None): a
    near-even split (no gradient depends on it).
    """
    if mini is None:
        return [int(i) for i in torch.arange(size).tensor_split(dp)[dp_rank]]
    if size % mini or mini % dp:
        raise ValueError(f"a batch of {size} prompts cannot be split into mini-batches of {mini} "
                         f"prompts over {dp} data-parallel ranks")
    share = mini // dp
    return [k * mini + dp_rank * share + i for k in range(size // mini) for i in range(share)]


class DataParallelBatches:
    """The global prompt batches of a loader, endlessly (epoch after epoch), sliced to this
    data-parallel rank by :func:`dp_rows`. Every rank draws the same global order."""

    def __init__(self, loader: PromptLoader, dp: int, dp_rank: int, mini: int | None = None) -> None:
        self.loader, self.dp, self.dp_rank, self.mini = loader, dp, dp_rank, mini
        self._it: Iterator[PromptBatch] | None = None

    def _slice(self, batch: PromptBatch) -> PromptBatch:
        return batch.select(dp_rows(len(batch), self.dp, self.dp_rank, self.mini))

    def next_batch(self) -> PromptBatch:
        """This rank's slice of the next global batch (a new epoch starts when one ends)."""
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return self._slice(next(self._it))
            except StopIteration:
                self._it = None
        raise RuntimeError("the data loader yields no batches")

    def batches(self) -> Iterator[PromptBatch]:
        """One pass over the loader (validation), each batch sliced to this rank."""
        for batch in self.loader:
            yield self._slice(batch)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None


@dataclass
class Components:
    """The built pieces of a run (see :func:`build_components`)."""

    info: ParallelInfo
    mode: Mode
    critic_role: CriticRole
    has_ground_truth: bool
    demo_data: bool  # every row is the demo task's (its exact-match reward applies)
    tokenizer: Any
    tokenizer_dir: str
    loader: DataParallelBatches
    val_loader: DataParallelBatches | None
    actor: Any
    ref: Any
    critic: Any
    actor_hf_config: Any
    rollout_engine: Any  # on this replica's rollout rank (TP 0, PP 0); None on its peers
    exporter: Any
    total_steps: int
    steps_per_epoch: int

    def decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Response texts (padding removed, special tokens skipped)."""
        lengths = mask.long().sum(-1).tolist()
        return [self.tokenizer.decode(r[:n].tolist(), skip_special_tokens=True) for r, n in zip(responses, lengths)]

    def share_from_rollout_rank(self, obj: Any) -> Any:
        """Broadcast ``obj`` from this replica's rollout rank (TP 0, PP 0) to its model-parallel
        group; identity when the group has one rank."""
        from megatron.core import parallel_state as ps

        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    def dp_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a float tensor over the data-parallel group; returns a float64 CPU tensor. The
        reduction runs on this rank's device (NCCL takes no CPU tensors)."""
        return self._dp_all_reduce(values, dist.ReduceOp.SUM)

    def dp_mean(self, value: float) -> float:
        return float(self.dp_sum(torch.tensor([value]))[0]) / self.info.dp

    def dp_max(self, value: float) -> float:
        return float(self._dp_all_reduce(torch.tensor([value]), dist.ReduceOp.MAX)[0])

    @staticmethod
    def _dp_all_reduce(values: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        from megatron_gad.runtime.distributed import device

        values = values.to(device=device(), dtype=torch.float64, copy=True)
        dist.all_reduce(values, op=op, group=ps.get_data_parallel_group())
        return values.cpu()


@dataclass
class TrainingEngines:
    """The training engines of a run: the actor, an optional frozen reference, an optional critic."""

    actor: Any
    ref: Any
    critic: Any


def _load_initial_weights(engine: Any, model_dir: str, hf_config: Any, role: str, source: str, info: ParallelInfo) -> str:
    """Fill this rank's stage from ``model_dir`` (collective: every rank calls it); returns how the
    weights were obtained, for the start-up line. ``source`` is :func:`check_model_weights`'s
    answer: ``random`` keeps megatron-core's initialisation (asked for by ``model.random_init``),
    ``megatron`` loads a ``hf_to_megatron.py`` checkpoint as is, otherwise the HF tensors are read
    (safetensors or ``.bin``). A critic from a causal LM (no ``score.weight``) gets a zero scalar
    head: the GAD recipe's "generator plus a scalar head", scoring every sequence alike until it
    has been trained; rank 0 says so in one line."""
    from megatron_gad.convert import fill_stage_from_hf
    from megatron_gad.hf_io import SafetensorsReader
    from megatron_gad.models.sharding import unwrap

    if source == "random":
        return "random initialisation (model.random_init=true)"
    if source == "megatron":
        from megatron_gad.checkpoint import load_model

        load_model(engine.chunks, model_dir)
        return f"the Megatron checkpoint {model_dir}"
    reader = SafetensorsReader(model_dir)
    if role == "critic" and "score.weight" not in reader.files:
        reader.add_critic_head(0.0)
        if info.rank == 0:
            print(f"[megatron_gad] critic: {model_dir} has no score.weight (a causal LM): its trunk is loaded "
                  "and a zero scalar head is added (every response scores alike until it trains)", flush=True)
    fill_stage_from_hf(unwrap(engine.chunks[0]), reader, hf_config, role)
    return f"{model_dir} ({source})"


def weight_source(cfg: TrainConfig, role: str) -> str:
    """Check, before any model is built, that ``role``'s ``model.path`` (``actor`` or ``critic``)
    holds weights (or asks for random ones): :func:`megatron_gad.hf_io.check_model_weights`'s
    answer. Raises a one-line ConversionError (a UserError) naming the key."""
    from megatron_gad.hf_io import check_model_weights

    model, key = (cfg.critic.model, "critic.model.path") if role == "critic" else (
        cfg.actor_rollout_ref.model, "actor_rollout_ref.model.path")
    return check_model_weights(model.path, key, role, model.random_init)


def check_mode(cfg: TrainConfig, mode: Mode) -> None:
    """Refuse settings the data's mode cannot serve (called before any model is built)."""
    t = cfg.trainer
    if mode is Mode.GAD and cfg.algorithm.adv_estimator == "gae":
        raise ConfigError("algorithm.adv_estimator=gae needs a value critic, but GAD data (rows with "
                         "teacher_response) makes the critic the discriminator: use adv_estimator=grpo")
    if mode is Mode.STANDARD and (t.generator_warmup_steps or t.generator_warmup_epochs):
        raise ConfigError("trainer.generator_warmup_steps/_epochs need GAD data (rows with teacher_response): "
                         "the generator warmup fine-tunes on the teacher responses")
    if mode is Mode.STANDARD and not cfg.custom_reward_function.path:
        raise ConfigError("data without teacher_response trains with a reward function: set "
                         "custom_reward_function.path (and .name)")


def _params_dtype(name: str) -> torch.dtype | None:
    """``model.dtype`` as the Megatron parameter dtype (``auto``: bf16 on GPU, fp32 on CPU)."""
    return None if name == "auto" else {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _copy_params(dst: Any, src: Any) -> None:
    """Copy every parameter of ``src``'s stage into ``dst``'s (same model, same layout)."""
    from megatron_gad.models.sharding import unwrap

    pairs = zip(unwrap(dst.chunks[0]).parameters(), unwrap(src.chunks[0]).parameters(), strict=True)
    with torch.no_grad():
        for d, s in pairs:
            d.copy_(s)


def _check_model_dir(path: str | None, key: str) -> str:
    if not path:
        raise ConfigError(f"{key} is required")
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r}: no such directory (a Hugging Face model directory is expected)")
    return path


def load_hf_config(path: str | None, key: str) -> Any:
    """``AutoConfig`` of the model directory named by config key ``key`` (read by
    :func:`megatron_gad.hf_io.read_hf_config`); ConfigError naming the key when it is missing or
    not a Hugging Face model directory (no download is ever attempted)."""
    path = _check_model_dir(path, key)
    try:
        return read_hf_config(path)
    except ConversionError as exc:
        raise ConfigError(f"{key}={path!r} is not a Hugging Face model directory: {exc}") from None


def load_tokenizer(path: str | None, key: str) -> Any:
    """``AutoTokenizer`` of the directory named by config key ``key`` (ConfigError naming it)."""
    from transformers import AutoTokenizer

    path = _check_model_dir(path, key)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{key}={path!r} holds no usable tokenizer: {exc}") from None


def recompute_settings(model: Any) -> dict[str, Any]:
    """``TransformerConfig`` overrides for ``model.enable_gradient_checkpointing`` (verl's key):
    megatron-core's full activation recompute of every layer (``uniform``, 1 layer per group)."""
    if not model.enable_gradient_checkpointing:
        return {}
    return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def build_training_engines(cfg: TrainConfig, actor_hf: Any, critic_hf: Any | None, info: ParallelInfo,
                           sources: dict[str, str]) -> TrainingEngines:
    """Build the actor (and reference) and, when ``critic_hf`` is given, the critic (collective).
    ``sources``: role -> :func:`weight_source` (``RunInputs.weight_sources``)."""
    from megatron_gad.engine import ActorEngine, CriticEngine
    from megatron_gad.models import model_args_from_hf

    tp, pp = info.tp, info.pp
    actor_rollout = cfg.actor_rollout_ref
    actor_args = model_args_from_hf(actor_hf)
    actor_tf = actor_args.transformer_config(tp, pp, _params_dtype(actor_rollout.model.dtype),
                                             **recompute_settings(actor_rollout.model))
    actor = ActorEngine.create(actor_tf, actor_args, actor_rollout.actor, actor_rollout.actor.optim)
    loaded = _load_initial_weights(actor, actor_rollout.model.path, actor_hf, "actor", sources["actor"], info)
    ref = None
    if actor_rollout.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward:
        ref_tf = actor_args.transformer_config(tp, pp, _params_dtype(actor_rollout.model.dtype))
        ref = ActorEngine.create(ref_tf, actor_args, actor_rollout.actor)
        _copy_params(ref, actor)  # the reference is the initial policy
    critic = None
    if critic_hf is not None:
        c = cfg.critic
        critic_args = model_args_from_hf(critic_hf)
        critic_tf = critic_args.transformer_config(tp, pp, _params_dtype(c.model.dtype), **recompute_settings(c.model))
        critic = CriticEngine.create(critic_tf, critic_args, c.loss_settings(), c.optim)
        _load_initial_weights(critic, c.model.path, critic_hf, "critic", sources["critic"], info)
    if info.rank == 0:
        print(f"[megatron_gad] actor weights: {loaded}", flush=True)
    return TrainingEngines(actor=actor, ref=ref, critic=critic)


def _is_rollout_rank(info: ParallelInfo) -> bool:
    return info.tp_rank == 0 and info.pp_rank == 0


def _rollout_ranks() -> list[int]:
    from megatron.core import parallel_state as ps

    gathered: list[Any] = [None] * dist.get_world_size()
    mine = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    dist.all_gather_object(gathered, (dist.get_rank(), mine))
    return [rank for rank, owns in gathered if owns]


def _total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    total = cfg.trainer.total_epochs * steps_per_epoch
    if cfg.trainer.total_training_steps is not None:
        total = min(total, cfg.trainer.total_training_steps)
    return total


@dataclass
class RunInputs:
    """What a run reads and checks before any model is built (see :func:`read_run_inputs`)."""

    tokenizer: Any
    tokenizer_dir: str
    train_loader: PromptLoader
    val_loader: PromptLoader | None
    critic_role: CriticRole
    actor_hf: Any
    critic_hf: Any | None  # None when the run has no critic (CriticRole.NONE)
    weight_sources: dict[str, str]  # role -> weight_source(), for the roles the run builds


def read_run_inputs(cfg: TrainConfig) -> RunInputs:
    """Read and check, in this order, the actor's model config and weights, the rollout engine's
    requirements (vLLM needs CUDA), the tokenizer, every training and validation row (and with
    them the data's mode against the config), then the critic's model config and weights when the
    run has a critic. Local work only (no process group): the launcher's preflight runs it in
    its own process, :func:`build_components` on every rank. Raises a one-line UserError naming
    the key, file or row."""
    from megatron_gad.data.dataset import build_loaders
    from megatron_gad.rollout.base import resolve_engine_name

    model = cfg.actor_rollout_ref.model
    actor_hf = load_hf_config(model.path, "actor_rollout_ref.model.path")
    sources = {"actor": weight_source(cfg, "actor")}
    resolve_engine_name(cfg.actor_rollout_ref.rollout)  # vllm without CUDA is refused here
    tokenizer_dir = model.tokenizer_path or model.path
    tokenizer = load_tokenizer(tokenizer_dir, "actor_rollout_ref.model.tokenizer_path" if model.tokenizer_path
                               else "actor_rollout_ref.model.path")
    train_loader, val_loader = build_loaders(cfg.data, tokenizer)
    check_mode(cfg, train_loader.mode)
    critic_role = CriticRole.decide(train_loader.mode, cfg.algorithm.adv_estimator)
    critic_hf = None
    if critic_role is not CriticRole.NONE:
        critic_hf = load_hf_config(cfg.critic.model.path, "critic.model.path")
        sources["critic"] = weight_source(cfg, "critic")
    return RunInputs(tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, train_loader=train_loader,
                     val_loader=val_loader, critic_role=critic_role, actor_hf=actor_hf, critic_hf=critic_hf,
                     weight_sources=sources)


def build_components(cfg: TrainConfig) -> Components:
    """Read and check the run's inputs (:func:`read_run_inputs`: every check that needs the data
    or the model directories runs there, before any model is built), then initialise the process
    groups (idempotent: the trainer has already started them to claim the run directory) and
    build the training engines, the rollout engine and the exporter (collective)."""
    from megatron_gad.rollout.base import TokenSpec, make_rollout_engine
    from megatron_gad.rollout.weight_export import WeightExporter

    inputs = read_run_inputs(cfg)
    train_loader, val_loader, actor_hf = inputs.train_loader, inputs.val_loader, inputs.actor_hf
    layout = cfg.actor_rollout_ref.megatron  # critic.megatron equals it (checked by load_config)
    info = init_distributed(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                            seed=cfg.trainer.seed)
    engines = build_training_engines(cfg, actor_hf, inputs.critic_hf, info, inputs.weight_sources)
    rollout_engine = None
    if _is_rollout_rank(info):
        rollout_engine = make_rollout_engine(cfg.actor_rollout_ref.rollout, actor_hf,
                                             TokenSpec.from_tokenizer(inputs.tokenizer))
    exporter = WeightExporter(
        engines.actor.chunks, actor_hf, dtype=rollout_dtype(cfg), dst_ranks=_rollout_ranks(),
        bucket_bytes=cfg.actor_rollout_ref.rollout.bucket_bytes,
    )
    rows = train_loader.dataset.rows
    return Components(
        info=info, mode=train_loader.mode, critic_role=inputs.critic_role,
        has_ground_truth=any(r.ground_truth is not None for r in rows),
        demo_data=all(r.data_source == DEMO_DATA_SOURCE for r in rows),
        tokenizer=inputs.tokenizer, tokenizer_dir=inputs.tokenizer_dir,
        loader=DataParallelBatches(train_loader, info.dp, info.dp_rank, cfg.actor_rollout_ref.actor.ppo_mini_batch_size),
        val_loader=DataParallelBatches(val_loader, info.dp, info.dp_rank) if val_loader is not None else None,
        actor=engines.actor, ref=engines.ref, critic=engines.critic, actor_hf_config=actor_hf,
        rollout_engine=rollout_engine, exporter=exporter,
        total_steps=_total_steps(cfg, len(train_loader)), steps_per_epoch=len(train_loader),
    )


def rollout_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype weights are exported in: ``rollout.dtype`` for vLLM; float32 for the CPU engine,
    which computes in float32 (bf16-rounded weights would shift its log-probs by ~1e-3)."""
    from megatron_gad.rollout.base import resolve_engine_name

    rollout = cfg.actor_rollout_ref.rollout
    return torch.float32 if resolve_engine_name(rollout) == "cpu" else rollout.torch_dtype
