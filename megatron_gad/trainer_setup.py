"""Build everything a run needs from its config: process groups, data, engines, rollout, exporter.

Called on every rank by :class:`megatron_gad.trainer.Trainer`. Config errors are raised before
any model is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_gad.config import TrainConfig, validate_config
from megatron_gad.data.batch import Mode, PromptBatch, PromptLoader
from megatron_gad.data.demo import DEMO_DATA_SOURCE
from megatron_gad.runtime import ParallelInfo, init_distributed


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
    rollout: Any
    exporter: Any
    rollout_n: int
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
class Engines:
    """The role engines of a run: the actor, an optional frozen reference, an optional critic."""

    actor: Any
    ref: Any
    critic: Any


def _load_hf_weights(engine: Any, hf_dir: str, hf_config: Any, role: str) -> bool:
    """Fill this rank's stage from the safetensors in ``hf_dir``; False when it has none (the
    Megatron initialisation stays, as for the demo's config-only models). A critic initialised
    from a causal LM (no ``score.weight``) gets a zero scalar head: the GAD recipe's "generator
    plus a scalar head", scoring every sequence alike until it has been trained."""
    import glob

    from megatron_gad.convert import fill_stage_from_hf
    from megatron_gad.hf_io import SafetensorsReader
    from megatron_gad.models.sharding import unwrap

    if not glob.glob(os.path.join(hf_dir, "*.safetensors")):
        return False
    reader = SafetensorsReader(hf_dir)
    if role == "critic" and "score.weight" not in reader.files:
        reader.add_critic_head(0.0)
    fill_stage_from_hf(unwrap(engine.chunks[0]), reader, hf_config, role)
    return True


def check_mode(cfg: TrainConfig, mode: Mode) -> None:
    """Refuse settings the data's mode cannot serve (called before any model is built)."""
    t = cfg.trainer
    if mode is Mode.GAD and cfg.algorithm.adv_estimator == "gae":
        raise ValueError("algorithm.adv_estimator=gae needs a value critic, but GAD data (rows with "
                         "teacher_response) makes the critic the discriminator: use adv_estimator=grpo")
    if mode is Mode.STANDARD and (t.generator_warmup_steps or t.generator_warmup_epochs):
        raise ValueError("trainer.generator_warmup_steps/_epochs need GAD data (rows with teacher_response): "
                         "the generator warmup fine-tunes on the teacher responses")
    if mode is Mode.STANDARD and not cfg.custom_reward_function.path:
        raise ValueError("data without teacher_response trains with a reward function: set "
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
        raise ValueError(f"{key} is required")
    if not os.path.isdir(path):
        raise ValueError(f"{key}={path!r}: no such directory (a Hugging Face model directory is expected)")
    return path


def load_hf_config(path: str | None, key: str) -> Any:
    """``AutoConfig`` of the model directory named by config key ``key``; ValueError naming the key
    when it is missing or not a Hugging Face model directory (no download is ever attempted)."""
    from transformers import AutoConfig

    path = _check_model_dir(path, key)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{key}={path!r} is not a Hugging Face model directory: {exc}") from None


def load_tokenizer(path: str | None, key: str) -> Any:
    """``AutoTokenizer`` of the directory named by config key ``key`` (ValueError naming it)."""
    from transformers import AutoTokenizer

    path = _check_model_dir(path, key)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{key}={path!r} holds no usable tokenizer: {exc}") from None


def build_engines(cfg: TrainConfig, actor_hf: Any, critic_hf: Any | None, info: ParallelInfo) -> Engines:
    """Build the actor (and reference) and, when ``critic_hf`` is given, the critic (collective)."""
    from megatron_gad.engine import ActorEngine, CriticEngine, CriticLossConfig
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf

    tp, pp = info.tp, info.pp
    arr = cfg.actor_rollout_ref
    actor_tf = transformer_config_from_hf(actor_hf, tp, pp, params_dtype=_params_dtype(arr.model.dtype))
    actor = ActorEngine.create(actor_tf, model_args_from_hf(actor_hf), arr.actor, arr.actor.optim)
    loaded = _load_hf_weights(actor, arr.model.path, actor_hf, "actor")
    ref = None
    if arr.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward:
        ref_tf = transformer_config_from_hf(actor_hf, tp, pp, params_dtype=_params_dtype(arr.model.dtype))
        ref = ActorEngine.create(ref_tf, model_args_from_hf(actor_hf), arr.actor)
        _copy_params(ref, actor)  # the reference is the initial policy
    critic = None
    if critic_hf is not None:
        c = cfg.critic
        settings = CriticLossConfig(ppo_epochs=c.ppo_epochs, cliprange_value=c.cliprange_value,
                                    loss_agg_mode=c.loss_agg_mode,
                                    ppo_micro_batch_size_per_gpu=c.ppo_micro_batch_size_per_gpu
                                    or arr.actor.ppo_micro_batch_size_per_gpu)
        critic_tf = transformer_config_from_hf(critic_hf, tp, pp, params_dtype=_params_dtype(c.model.dtype))
        critic = CriticEngine.create(critic_tf, model_args_from_hf(critic_hf), settings, c.optim)
        _load_hf_weights(critic, c.model.path, critic_hf, "critic")
    if info.rank == 0:
        print(f"[megatron_gad] actor weights: {'from ' + arr.model.path if loaded else 'Megatron initialisation'}",
              flush=True)
    return Engines(actor=actor, ref=ref, critic=critic)


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


def build_components(cfg: TrainConfig) -> Components:
    """Initialise the process groups and build data, engines, rollout and exporter (collective)."""
    from megatron_gad.data.dataset import build_loaders
    from megatron_gad.rollout.base import TokenSpec, make_rollout_engine
    from megatron_gad.rollout.weight_export import WeightExporter

    layout = cfg.actor_rollout_ref.megatron
    critic_layout = cfg.critic.megatron
    if critic_layout is not None and (critic_layout.tensor_model_parallel_size, critic_layout.pipeline_model_parallel_size) != (
        layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    ):
        raise ValueError("critic.megatron must equal actor_rollout_ref.megatron (both roles share one TP x PP layout)")
    info = init_distributed(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                            seed=cfg.trainer.seed)
    validate_config(cfg, world_size=info.world_size)
    model = cfg.actor_rollout_ref.model
    tokenizer_dir = model.tokenizer_path or model.path
    tokenizer = load_tokenizer(tokenizer_dir, "actor_rollout_ref.model.tokenizer_path" if model.tokenizer_path
                               else "actor_rollout_ref.model.path")
    train_loader, val_loader = build_loaders(cfg.data, tokenizer)
    mode = train_loader.mode
    check_mode(cfg, mode)
    actor_hf = load_hf_config(model.path, "actor_rollout_ref.model.path")
    needs_critic = mode is Mode.GAD or cfg.algorithm.adv_estimator == "gae"
    critic_hf = load_hf_config(cfg.critic.model.path, "critic.model.path") if needs_critic else None
    engines = build_engines(cfg, actor_hf, critic_hf, info)
    rollout = None
    if _is_rollout_rank(info):
        rollout = make_rollout_engine(cfg.actor_rollout_ref.rollout, actor_hf, TokenSpec.from_tokenizer(tokenizer))
    exporter = WeightExporter(
        engines.actor.chunks, actor_hf, dtype=rollout_dtype(cfg), dst_ranks=_rollout_ranks(),
        bucket_bytes=cfg.actor_rollout_ref.rollout.bucket_bytes,
    )
    rows = train_loader.dataset.rows
    return Components(
        info=info, mode=mode,
        has_ground_truth=any(r.ground_truth is not None for r in rows),
        demo_data=all(r.data_source == DEMO_DATA_SOURCE for r in rows),
        tokenizer=tokenizer, tokenizer_dir=tokenizer_dir,
        loader=DataParallelBatches(train_loader, info.dp, info.dp_rank, cfg.actor_rollout_ref.actor.ppo_mini_batch_size),
        val_loader=DataParallelBatches(val_loader, info.dp, info.dp_rank) if val_loader is not None else None,
        actor=engines.actor, ref=engines.ref, critic=engines.critic, actor_hf_config=actor_hf,
        rollout=rollout, exporter=exporter, rollout_n=cfg.actor_rollout_ref.rollout.n,
        total_steps=_total_steps(cfg, len(train_loader)), steps_per_epoch=len(train_loader),
    )


def rollout_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype weights are exported in: ``rollout.dtype`` for vLLM; float32 for the CPU engine,
    which computes in float32 (bf16-rounded weights would shift its log-probs by ~1e-3)."""
    from megatron_gad.rollout.base import resolve_engine_name

    rollout = cfg.actor_rollout_ref.rollout
    return torch.float32 if resolve_engine_name(rollout) == "cpu" else rollout.torch_dtype
