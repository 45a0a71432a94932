"""Rollout engine interface: configuration, output type, engine ABC, factory and agreement metric.

A rollout engine turns left-padded prompts into ``n`` sampled responses per prompt, with the
log-probability of every sampled token under the sampling distribution. Its weights come from the
actor through :mod:`megatron_gad.rollout.weight_export` as buckets of ``(hf_name, tensor)``.

Two implementations: ``cpu`` (:mod:`megatron_gad.rollout.cpu_engine`, a transformers model with a
KV-cached sampling loop) and ``vllm`` (:mod:`megatron_gad.rollout.vllm_engine`). The config key
``actor_rollout_ref.rollout.name`` picks one; ``auto`` takes vllm when CUDA is present and vllm
imports, the CPU engine otherwise.
"""

from __future__ import annotations

import abc
import importlib.util
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from megatron_gad.errors import UserError

#: Default weight-sync bucket: the most bytes of HF tensors gathered and sent at once (the
#: exporter's memory bound per rank). Also the bucket of the HF export of a live model.
DEFAULT_BUCKET_BYTES = 512 * 1024**2

#: One bucket of exported weights: HF parameter names and full tensors in the inference dtype.
WeightBucket = list[tuple[str, Tensor]]

ENGINE_NAMES = ("auto", "cpu", "vllm")


class RolloutConfigError(UserError, ValueError):
    """An invalid ``actor_rollout_ref.rollout.*`` value, or an engine that cannot run here."""


class ModelDivergedError(RuntimeError):
    """The policy's weights or logits are no longer finite (training diverged): nothing sensible
    can be sampled from, or exported of, it."""


@dataclass
class RolloutConfig:
    """Settings of the rollout engine (``actor_rollout_ref.rollout.*``)."""

    name: str = "auto"
    """Engine: ``cpu``, ``vllm`` or ``auto`` (vllm when CUDA is present and vllm imports, else cpu)."""
    n: int = 1
    """Responses sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed under ``logits / temperature``."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 disables)."""
    top_k: int = -1
    """Keep only the k most likely tokens (-1 or 0 disables)."""
    prompt_length: int = 512
    """Longest (left-padded) prompt the engine must accept (vLLM sizes its context from it)."""
    response_length: int = 512
    """Maximum number of generated tokens per response."""
    dtype: str = "bfloat16"
    """Inference dtype of the weights (vllm); the CPU engine always computes in float32."""
    gpu_memory_utilization: float = 0.5
    """vLLM: fraction of GPU memory for weights + KV cache (the rest stays with training)."""
    tensor_model_parallel_size: int = 1
    """vLLM: tensor parallelism inside the inference engine."""
    enforce_eager: bool = True
    """vLLM: skip CUDA-graph capture (faster start, slower decode)."""
    free_cache_engine: bool = True
    """vLLM: sleep (release weights and KV cache memory) between rollouts."""
    max_num_seqs: int = 256
    """vLLM: most sequences decoded together."""
    seed: int = 0
    """Base seed of the sampler (each ``generate`` call may pass its own)."""
    log_prob_micro_batch_size_per_gpu: int | None = None
    """verl's key: sequences per micro-batch when the actor recomputes the rollout's log-probs
    (None: ``actor.ppo_micro_batch_size_per_gpu``)."""
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    """Weight-sync bucket size in bytes (see :class:`megatron_gad.rollout.weight_export.WeightExporter`)."""

    def validate(self, where: str = "actor_rollout_ref.rollout") -> None:
        """Raise RolloutConfigError naming ``where.<field>`` for an invalid value."""
        checks = [
            (self.name in ENGINE_NAMES, "name", f"one of {', '.join(ENGINE_NAMES)}"),
            (self.n >= 1, "n", ">= 1"),
            (self.temperature > 0, "temperature", "> 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]"),
            (self.top_k >= -1, "top_k", ">= -1"),
            (self.response_length >= 1, "response_length", ">= 1"),
            (self.prompt_length >= 1, "prompt_length", ">= 1"),
            (self.dtype in _DTYPES, "dtype", f"one of {', '.join(_DTYPES)}"),
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "in (0, 1]"),
            (self.bucket_bytes >= 1, "bucket_bytes", ">= 1"),
            ((self.log_prob_micro_batch_size_per_gpu or 1) >= 1, "log_prob_micro_batch_size_per_gpu", ">= 1 or null"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise RolloutConfigError(f"{where}.{key} must be {expected}, got {getattr(self, key)!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype."""
        return _DTYPES[self.dtype]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TokenSpec:
    """Token ids an engine needs from the tokenizer: the pad id and the ids that end a response."""

    pad_token_id: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "TokenSpec":
        """Read pad/eos ids from a transformers tokenizer (pad falls back to eos)."""
        eos = tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        return cls(pad_token_id=int(pad), eos_token_ids=eos_ids)


@dataclass
class RolloutOutput:
    """Responses of one ``generate`` call; rows ordered prompt0 x n, prompt1 x n, ...

    ``responses``: [B*n, R] long, right-padded with the pad id (R = longest response).
    ``response_mask``: [B*n, R] long, 1 on generated tokens (including a final EOS).
    ``rollout_log_probs``: [B*n, R] float32, log-prob of each sampled token under the engine's
    processed sampling distribution (see the engine's docstring); 0 on padding.
    """

    responses: Tensor
    response_mask: Tensor
    rollout_log_probs: Tensor


class RolloutEngine(abc.ABC):
    """A generation engine whose weights are replaced from the trainer's exporter.

    Called on the ranks that own an engine (the exporter's ``dst_ranks``); the trainer calls
    ``wake()`` before loading weights / generating and ``sleep()`` before training.
    """

    @abc.abstractmethod
    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, n: int | None = None,
        greedy: bool = False, seed: int | None = None,
    ) -> RolloutOutput:
        """Sample ``n`` (default ``config.n``) responses for each prompt.

        ``prompt_ids``/``prompt_mask``: [B, P] left-padded. ``greedy`` takes the argmax (then the
        log-probs are under temperature 1 without top-k/top-p). ``seed`` makes sampling reproducible.
        """

    @abc.abstractmethod
    def load_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Replace the engine's weights with the HF-named tensors of ``buckets`` (in place)."""

    def weight_destinations(self) -> Mapping[str, Tensor] | None:
        """HF name -> the tensor the engine computes with, for the exporter to write the next
        weights straight into (``WeightExporter.buckets(into=...)``), or None: the engine takes
        new full tensors (the default; vLLM). Passing them also tells the exporter that the
        engine keeps what it is handed as its weights: a bucket may then carry a tensor the
        exporter keeps and rewrites on later syncs (its shared-memory arena), to be taken as
        the parameter's storage.

        An engine that returns them accepts that its weights are overwritten while the export
        runs, before the finite check at its end: it must treat a ``load_weights`` whose
        buckets did not run to completion as leaving it without usable weights."""
        return None

    def sleep(self) -> None:
        """Release accelerator memory between rollouts (no-op where there is nothing to release)."""

    def wake(self) -> None:
        """Regain what :meth:`sleep` released."""


def vllm_unavailable_reason() -> str | None:
    """Why the vllm engine cannot run in this process, or None when it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install 'megatron_gad[vllm]')"
    return None


def resolve_engine_name(cfg: RolloutConfig) -> str:
    """``cfg.name`` with ``auto`` resolved; RolloutConfigError if ``vllm`` cannot run here."""
    cfg.validate()
    reason = vllm_unavailable_reason()
    if cfg.name == "auto":
        return "vllm" if reason is None else "cpu"
    if cfg.name == "vllm" and reason is not None:
        raise RolloutConfigError(f"actor_rollout_ref.rollout.name=vllm cannot run here: {reason}; use name=cpu")
    return cfg.name


def make_rollout_engine(cfg: RolloutConfig, hf_config: Any, tokens: TokenSpec) -> RolloutEngine:
    """Build the engine ``cfg.name`` selects for the actor described by ``hf_config``.

    The engine starts with placeholder weights: call ``load_weights`` with the exporter's buckets
    before generating. Called only on ranks that own an engine. The built-in engine (``cpu``)
    runs on this rank's device (its GPU when CUDA is available, else the CPU).
    """
    name = resolve_engine_name(cfg)
    if name == "vllm":
        from megatron_gad.rollout.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(cfg, hf_config, tokens)
    from megatron_gad.rollout.cpu_engine import CPURolloutEngine
    from megatron_gad.runtime.distributed import device

    # the built-in engine computes where the trainer does: this rank's GPU when there is one
    return CPURolloutEngine(cfg, hf_config, tokens, device=str(device()))


def pad_rows(rows: Sequence[Sequence[float]], width: int, value: float, dtype: torch.dtype) -> Tensor:
    """Stack variable-length rows into a [len(rows), width] tensor right-padded with ``value``."""
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(list(row), dtype=dtype)
    return out
