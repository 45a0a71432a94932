"""vLLM rollout engine: ``vllm.LLM`` built from the actor's HF config with dummy weights, updated
in place from the exporter's buckets, sleeping between rollouts.

Supported: vLLM 0.10.2 - 0.33.x (:data:`SUPPORTED_VLLM`; the V1 engine). Every release in that
range on PyPI (0.10.2, 0.11.0 - 0.11.2, 0.12.0, 0.13.0, 0.14.0 - 0.14.1, ..., 0.33.0: 36
releases, :data:`CHECKED_VLLM`) was read in its published wheel's source for each call made
here:

- construction: ``LLM(model, skip_tokenizer_init=True, load_format="dummy", dtype,
  tensor_parallel_size, gpu_memory_utilization, max_model_len, max_num_seqs, enforce_eager,
  enable_sleep_mode=True, logprobs_mode="processed_logprobs", generation_config="vllm",
  worker_extension_cls=<qualified name>, seed)``; every keyword is a field of ``EngineArgs`` in
  every release (``LLM.__init__`` forwards ``**kwargs``);
- ``worker_extension_cls``: mixed into the worker class's bases, its methods callable by name
  through ``LLM.collective_rpc(method, timeout=None, args=(), kwargs=None)`` (same signature
  everywhere; the mixing lives in ``vllm/worker/worker_base.py`` up to 0.11.0 and in
  ``vllm/v1/worker/worker_base.py`` from 0.11.1); the worker's model is ``model_runner.model``,
  whose ``load_weights(weights)`` takes ``(hf_name, tensor)`` pairs;
- sleep and wake: ``LLM.sleep(level)`` (level 1 offloads the weights to host memory and drops
  the KV cache; level 2 drops both, the worker keeping only the model's buffers) and
  ``LLM.wake_up(tags)`` with tags ``"weights"`` and ``"kv_cache"`` in every release. From 0.17.0
  ``sleep`` takes ``mode="abort"`` too and pauses the scheduler, which resumes only once every
  tag is awake again; up to 0.16.x the allocator re-maps whatever ``wake_up`` names even when
  already awake. This engine therefore wakes each tag exactly once per sleep: ``weights`` before
  a weight load, ``kv_cache`` after it (so the KV cache is not resident while buckets arrive);
- ``logprobs_mode="processed_logprobs"``: an ``EngineArgs`` field everywhere (``LogprobsMode``
  is an enum in 0.10.2 and a ``Literal`` from 0.11.0; both take the string). The per-step
  log-probs are ``{token_id: Logprob}`` mappings: a list of them, or, from 0.11.1 and only when
  asked for (``VLLM_FLAT_LOGPROBS`` in 0.11.x, ``SamplingParams.flat_logprobs`` from 0.12.0,
  off by default), a ``FlatLogprobs`` sequence that indexes alike;
- token prompts: ``TokensPrompt(prompt_token_ids=...)`` from ``vllm.inputs`` (defined in
  ``vllm/inputs/data.py`` up to 0.18.x, ``vllm/inputs/llm.py`` from 0.19.0, exported from
  ``vllm.inputs`` throughout); ``LLM.generate(prompts, sampling_params, use_tqdm=...)``;
- ``SamplingParams(n, temperature, top_p, top_k, max_tokens, logprobs=0, seed, stop_token_ids,
  detokenize=False)``: fields of the same meaning in every release; ``top_k=0`` disables top-k;
- ``LLM.reset_prefix_cache()`` without arguments (its optional parameters: ``device`` up to
  0.11.0, none in 0.11.1 - 0.11.2, ``reset_running_requests`` from 0.12.0, ``reset_connector``
  from 0.13.0).

Each vLLM release pins one torch: 0.10.2 - 0.11.0 torch 2.8.0, 0.11.1 - 0.13.0 2.9.0, 0.14.0 -
0.16.0 2.9.1, 0.17.0 - 0.19.1 2.10.0, 0.20.0 - 0.26.0 2.11.0, 0.27.0 - 0.32.0 2.13.0, 0.33.0
2.14.0 (``Requires-Dist`` of the wheels).

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
from megatron_gad.seeds import prompt_seeds

SUPPORTED_VLLM = ">=0.10.2,<0.34"

#: The releases whose source was checked against this engine (every PyPI release in the range).
CHECKED_VLLM = (
    "0.10.2", "0.11.0", "0.11.1", "0.11.2", "0.12.0", "0.13.0", "0.14.0", "0.14.1", "0.15.0", "0.15.1", "0.16.0",
    "0.17.0", "0.17.1", "0.18.0", "0.18.1", "0.19.0", "0.19.1", "0.20.0", "0.20.1", "0.20.2", "0.21.0", "0.22.0",
    "0.22.1", "0.23.0", "0.24.0", "0.25.0", "0.25.1", "0.26.0", "0.27.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0",
    "0.31.0", "0.32.0", "0.33.0",
)

#: ``LLM.sleep`` levels this engine uses (see the module docstring).
SLEEP_LEVELS = (1, 2)


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
        one with rollout TP 1, see the module docstring). ``sleep_level``: 1 keeps a host copy of
        the weights while asleep; 2 keeps none (less host memory), so a weight load must follow
        every sleep before the next generation."""
        if sleep_level not in SLEEP_LEVELS:
            raise RolloutConfigError(f"vllm rollout engine: sleep level {sleep_level} is not one of {SLEEP_LEVELS}")
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
        self._asleep: set[str] = set()  # memory tags released by the last sleep and not woken yet
        self._weights_valid = False  # the dummy weights until the first load

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
        """Release the GPU memory of the weights and the KV cache for training (level 1: the
        weights go to host memory; level 2: they are dropped, a weight load must follow)."""
        if self.cfg.free_cache_engine and not self.sleeping:
            self.llm.sleep(level=self.sleep_level)
            self.sleeping = True
            self._asleep = {"weights", "kv_cache"}
            if self.sleep_level >= 2:
                self._weights_valid = False

    def _wake_tags(self, tags: list[str]) -> None:
        """Wake the named memory tags that are asleep, each once (see the module docstring)."""
        todo = [t for t in tags if t in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)
        self.sleeping = bool(self._asleep)

    def wake(self) -> None:
        """Re-allocate weights and KV cache on the GPU."""
        self._wake_tags(["weights", "kv_cache"])

    # ---------------------------------------------------------------- weights
    def load_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Load HF-named buckets into the model; resets the prefix cache, whose KV entries belong
        to the old weights. A sleeping engine wakes its weights first and its KV cache only once
        the weights are loaded, so that the two are never resident beside the buckets at once."""
        self._wake_tags(["weights"])
        for bucket in buckets:
            payload = bucket if self.in_process else pack_bucket(bucket)
            self.llm.collective_rpc("mgad_load_weights", args=(payload,))
            del bucket, payload
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._weights_valid = True
        self._wake_tags(["kv_cache"])
        self.llm.reset_prefix_cache()

    # ---------------------------------------------------------------- generation
    def _sampling_params(self, n: int, greedy: bool, seed: int | None) -> Any:
        from vllm import SamplingParams

        top_k = self.cfg.top_k if self.cfg.top_k > 0 else 0  # 0 disables top-k in every supported release
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
        """Sample ``n`` responses per left-padded prompt ([B, P]). Prompt i uses the seed
        ``prompt_seeds(seed, B)[i]`` (vLLM gives its j-th sample ``+ j``): unrelated streams for
        every prompt of every call, whatever the calls' seeds."""
        from vllm.inputs import TokensPrompt

        if not self._weights_valid:
            raise RuntimeError("vllm rollout engine: load_weights must run before generate (and after a level-2 sleep)")
        self.wake()
        n = self.cfg.n if n is None else n
        base = self.cfg.seed if seed is None else seed
        prompts = [
            TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())
        ]
        params = [self._sampling_params(n, greedy, s) for s in prompt_seeds(base, len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens, logps = [], []
        for request in outputs:
            for completion in sorted(request.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                tokens.append(ids)
                logps.append([_sampled_logprob(step, tok) for step, tok in zip(completion.logprobs, ids)])
        width = max(1, max(len(t) for t in tokens))
        return RolloutOutput(
            responses=pad_rows(tokens, width, self.tokens.pad_token_id, torch.long),
            response_mask=pad_rows([[1] * len(t) for t in tokens], width, 0, torch.long),
            rollout_log_probs=pad_rows(logps, width, 0.0, torch.float32),
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
