"""vLLM rollout engine: ``vllm.LLM`` built from the actor's HF config with dummy weights, updated
in place from the exporter's buckets, sleeping between rollouts.

Targets vLLM 0.10.2 - 0.11.x (the V1 engine): ``LLM(load_format="dummy", enable_sleep_mode=True,
logprobs_mode="processed_logprobs", skip_tokenizer_init=True)``, weights through
``LLM.collective_rpc`` calling the model's own ``load_weights`` (which fuses HF q/k/v and
gate/up and shards them over vLLM's TP), ``LLM.sleep(level=1)`` / ``LLM.wake_up()``, and
``SamplingParams(n, temperature, top_p, top_k, max_tokens, logprobs=0, seed, stop_token_ids)``.

``processed_logprobs`` are the log-probs after temperature, top-k and top-p, i.e. of the
renormalised distribution the token was sampled from, the same quantity the CPU engine returns.

vllm is imported inside the constructor only. Two placements of vLLM's engine core:

- in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) when this process is a world of one
  and ``tensor_model_parallel_size == 1``: buckets of CUDA tensors reach the model by reference;
- otherwise in vLLM's own engine process (its default), which gets a fresh torch.distributed world
  (vLLM cannot join the trainer's multi-rank default group) and this rank's GPU
  (``CUDA_VISIBLE_DEVICES`` narrowed while it starts); buckets then travel through vLLM's RPC
  as one safetensors byte string each (:func:`pack_bucket`): vLLM decodes utility-call arguments
  without a schema, so a tensor would arrive as a ``[dtype, shape, buffer]`` list, while bytes
  arrive as bytes in every version.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from megatron_gad.hf_io import hf_output_config
from megatron_gad.rollout.base import (
    RolloutConfig,
    RolloutConfigError,
    RolloutEngine,
    RolloutOutput,
    TokenSpec,
    WeightBucket,
    pad_rows,
    vllm_unavailable_reason,
)

SUPPORTED_VLLM = ">=0.10.2,<0.12"


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``) so the weight-loading
    method can be called by name through ``collective_rpc``, without pickling a callable."""

    def mgad_load_weights(self, bucket: WeightBucket | bytes) -> int:
        """Load HF-named tensors (a bucket, or one packed by :func:`pack_bucket`) into this
        worker's model (its ``load_weights`` fuses q/k/v and gate/up and takes this worker's TP
        shard). Returns the number of tensors."""
        if isinstance(bucket, (bytes, bytearray, memoryview)):
            bucket = unpack_bucket(bucket)
        model = self.model_runner.model  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        model.load_weights(weights=((name, t.to(device, non_blocking=True)) for name, t in bucket))
        return len(bucket)


_EXTENSION = f"{__name__}.WeightSyncExtension"


def pack_bucket(bucket: WeightBucket) -> bytes:
    """A bucket as one safetensors byte string (host copies of its tensors, names kept)."""
    from safetensors.torch import save

    return save({name: t.detach().to("cpu", copy=True).contiguous() for name, t in bucket})


def unpack_bucket(data: bytes | bytearray | memoryview) -> WeightBucket:
    """The ``(name, tensor)`` pairs of a bucket packed by :func:`pack_bucket`."""
    from safetensors.torch import load

    return list(load(bytes(data)).items())


def check_vllm_version(version: str) -> None:
    """RolloutConfigError unless ``version`` lies in :data:`SUPPORTED_VLLM` (the engine core and
    logprobs API this engine was written against)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if Version(version) not in SpecifierSet(SUPPORTED_VLLM):
        raise RolloutConfigError(
            f"vllm {version} is installed; the vllm rollout engine supports vllm{SUPPORTED_VLLM} "
            f"(pip install 'megatron_gad[vllm]'), or use actor_rollout_ref.rollout.name=cpu"
        )


class VLLMRolloutEngine(RolloutEngine):
    """Rollout engine on ``vllm.LLM``; construct on the exporter's destination rank (one GPU)."""

    def __init__(self, cfg: RolloutConfig, hf_config: Any, tokens: TokenSpec, sleep_level: int = 1,
                 in_process: bool | None = None) -> None:
        """``in_process``: run vLLM's engine core in this process (default: only in a world of
        one with rollout TP 1, see the module docstring)."""
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise RolloutConfigError(f"actor_rollout_ref.rollout.name=vllm cannot run here: {reason}")
        import vllm

        check_vllm_version(vllm.__version__)
        cfg.validate()
        self.cfg, self.tokens, self.sleep_level = cfg, tokens, sleep_level
        if in_process is None:
            in_process = cfg.tensor_model_parallel_size == 1 and not _in_multi_rank_world()
        self.in_process = in_process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        self._model_dir = tempfile.TemporaryDirectory(prefix="mgad_vllm_model_")
        # config.json only (weights come from the exporter), naming the *ForCausalLM class vLLM
        # looks up even when the actor's config came without ``architectures``.
        hf_output_config(hf_config, "actor", cfg.torch_dtype).save_pretrained(self._model_dir.name)
        with _visible_devices(None if self.in_process else _this_gpu(cfg.tensor_model_parallel_size)):
            self.llm = self._build_llm(cfg)
        self.sleeping = False

    def _build_llm(self, cfg: RolloutConfig) -> Any:
        import vllm

        return vllm.LLM(
            model=self._model_dir.name,
            skip_tokenizer_init=True,
            load_format="dummy",
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_model_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.prompt_length + cfg.response_length,
            max_num_seqs=cfg.max_num_seqs,
            enforce_eager=cfg.enforce_eager,
            enable_sleep_mode=True,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            worker_extension_cls=_EXTENSION,
            seed=cfg.seed,
        )

    # ---------------------------------------------------------------- memory
    def sleep(self) -> None:
        """Offload weights to CPU and drop the KV cache (level 1), freeing GPU memory for training."""
        if self.cfg.free_cache_engine and not self.sleeping:
            self.llm.sleep(level=self.sleep_level)
            self.sleeping = True

    def wake(self) -> None:
        """Re-allocate weights and KV cache on the GPU."""
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    # ---------------------------------------------------------------- weights
    def load_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Load HF-named buckets into the model (wakes the engine first); resets the prefix cache,
        whose KV entries belong to the old weights."""
        self.wake()
        for bucket in buckets:
            payload = bucket if self.in_process else pack_bucket(bucket)
            self.llm.collective_rpc("mgad_load_weights", args=(payload,))
            del bucket, payload
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.llm.reset_prefix_cache()

    # ---------------------------------------------------------------- generation
    def _sampling_params(self, n: int, greedy: bool, seed: int | None) -> Any:
        from vllm import SamplingParams

        top_k = self.cfg.top_k if self.cfg.top_k > 0 else 0  # 0 disables (vLLM >= 0.10 also takes -1)
        return SamplingParams(
            n=n,
            temperature=0.0 if greedy else self.cfg.temperature,
            top_p=1.0 if greedy else self.cfg.top_p,
            top_k=0 if greedy else top_k,
            max_tokens=self.cfg.response_length,
            logprobs=0,
            seed=seed,
            stop_token_ids=list(self.tokens.eos_token_ids),
            detokenize=False,
        )

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, n: int | None = None,
        greedy: bool = False, seed: int | None = None,
    ) -> RolloutOutput:
        """Sample ``n`` responses per left-padded prompt ([B, P]). Prompt i uses seed
        ``seed + i * n`` (vLLM gives its j-th sample ``+ j``), so all rows are distinct streams."""
        n = self.cfg.n if n is None else n
        base = self.cfg.seed if seed is None else seed
        prompts = [
            {"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())
        ]
        params = [self._sampling_params(n, greedy, base + i * n) for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens, logps, reasons = [], [], []
        for request in outputs:
            for completion in sorted(request.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                tokens.append(ids)
                logps.append([_sampled_logprob(step, tok) for step, tok in zip(completion.logprobs, ids)])
                reasons.append("stop" if completion.finish_reason == "stop" else "length")
        width = max(1, max(len(t) for t in tokens))
        return RolloutOutput(
            responses=pad_rows(tokens, width, self.tokens.pad_token_id, torch.long),
            response_mask=pad_rows([[1] * len(t) for t in tokens], width, 0, torch.long),
            rollout_log_probs=pad_rows(logps, width, 0.0, torch.float32),
            finish_reasons=reasons,
        )


def _in_multi_rank_world() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _this_gpu(count: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` value naming this rank's GPU and the next ``count - 1`` (physical ids)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    first = torch.cuda.current_device()
    if first + count > len(ids):
        raise RolloutConfigError(
            f"actor_rollout_ref.rollout.tensor_model_parallel_size={count} needs GPUs {first}..{first + count - 1}, "
            f"only {len(ids)} visible"
        )
    return ",".join(ids[first: first + count])


@contextlib.contextmanager
def _visible_devices(value: str | None) -> Iterator[None]:
    """Narrow ``CUDA_VISIBLE_DEVICES`` for processes started inside the block (this process's CUDA
    context is already bound and does not change)."""
    if value is None:
        yield
        return
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def _sampled_logprob(step: Any, token: int) -> float:
    """The sampled token's entry of one step's ``{token_id: Logprob}`` mapping."""
    entry = step[token]
    return float(entry.logprob if hasattr(entry, "logprob") else entry)
