"""The one place where megatron-core's CUDA assumptions are adapted to a CPU-only machine.

megatron-core 0.16.1 runs on CPU with gloo except for a handful of spots that allocate on
``device="cuda"``, synchronise the CUDA stream, or assert CUDA tensor types. Each shim below is
documented with the megatron-core function it serves. They are applied by :func:`apply` only when
CUDA is absent, at most once per process, and refuse to run on a megatron-core version they were
not written for (the patched internals change between releases).

Nothing outside this module may patch megatron-core or torch.
"""

from __future__ import annotations

import importlib
import logging
import types
from typing import Any, Callable, Iterable

import torch

from megatron_gad.errors import UserError

logger = logging.getLogger(__name__)

#: megatron-core releases these shims were written and tested against.
SUPPORTED_MEGATRON_VERSIONS = ("0.16.1",)

_applied = False


class CpuShimError(UserError, RuntimeError):
    """Raised when the shims cannot be applied safely (unknown megatron-core version)."""


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")``) to the CPU."""
    if device is None:
        return device
    if isinstance(device, int) or str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


def _factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a torch tensor factory so that a CUDA ``device=`` builds a CPU tensor instead."""

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "factory")
    wrapped.__doc__ = fn.__doc__
    return wrapped


class _CpuTorchView(types.ModuleType):
    """A view of the ``torch`` module in which tensor factories with ``device="cuda"`` build CPU
    tensors. Installed as the ``torch`` global of individual megatron-core modules only; every
    other attribute resolves to the real torch."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like")

    def __init__(self) -> None:
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _tensor_cuda_identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _clip_grad_by_total_norm_cpu(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """CPU twin of megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32.

    The original asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``; the arithmetic is the
    same: scale every fp32 gradient in place by ``max_norm / (total_norm + 1e-6)`` when below 1.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for grad in grads:
        if grad.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gradient clipping expects fp32/bf16 grads, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _get_all_rng_states_cpu() -> tuple[torch.Tensor, None, dict]:
    """CPU twin of megatron.core.tensor_parallel.random._get_all_rng_states: the CPU generator's
    state and the model-parallel tracker's states (the original also reads the CUDA generator)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return torch.get_rng_state(), None, get_cuda_rng_tracker().get_states()


def _set_all_rng_states_cpu(cpu_rng_state: torch.Tensor, cuda_rng_state: None, tracker_states: dict) -> None:
    """CPU twin of ``_set_all_rng_states``: restores what :func:`_get_all_rng_states_cpu` saved."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(cpu_rng_state)
    get_cuda_rng_tracker().set_states(tracker_states)


# Modules whose ``torch`` global is swapped for the CPU view, with the functions that need it.
_CUDA_LITERAL_MODULES = {
    # forward_backward_* build the token-count tensor with torch.zeros(..., device="cuda").
    "megatron.core.pipeline_parallel.schedules": "forward_backward_no_pipelining / _pipelining",
    # get_grad_norm_fp32 and count_zeros_fp32 allocate their reduction buffers on "cuda".
    "megatron.core.optimizer.clip_grads": "get_grad_norm_fp32, count_zeros_fp32",
    # local_multi_tensor_l2_norm (the non-apex fallback) returns its norm on "cuda".
    "megatron.core.utils": "local_multi_tensor_l2_norm",
    # FP32Optimizer.__init__ / MixedPrecisionOptimizer keep _scale / found_inf on "cuda".
    "megatron.core.optimizer.optimizer": "FP32Optimizer.__init__, MixedPrecisionOptimizer.__init__",
}


def _write_buckets_in_process(transform_list: list, use_msc: bool, rank: int, write_buckets: list,
                              global_results_queue: Any) -> None:
    """FileSystemWriterAsync.write_preloaded_data_multiproc without processes: the same per-bucket
    writer (``write_preloaded_data``, fsync included) run here, bucket after bucket, with the
    results handed over in the same ``{bucket index: results}`` form (or the first exception)."""
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results: dict[int, Any] | Exception = {}
    local: queue.Queue = queue.Queue()
    count: queue.Queue = queue.Queue()
    extra = {"use_msc": use_msc} if use_msc else {}
    for index, bucket in enumerate(write_buckets):
        count.put(index)
        FileSystemWriterAsync.write_preloaded_data(transform_list, index, bucket, local, count, True, **extra)
        _, outcome = local.get()
        if isinstance(outcome, Exception):
            results = outcome
            break
        results[index] = outcome
    global_results_queue.put(results)


_WRITE_RESULTS: Any = None


def _in_process_results_queue() -> Any:
    """filesystem_async._get_write_results_queue without a spawned Manager process."""
    global _WRITE_RESULTS
    if _WRITE_RESULTS is None:
        import queue

        _WRITE_RESULTS = queue.Queue()
    return _WRITE_RESULTS


class _JitFuserOffFinder:
    """A one-shot import hook: runs ``megatron.core.jit`` as usual, then megatron-core's own
    ``disable_jit_fuser()`` before any other megatron-core module decorates with ``jit_fuser``."""

    NAME = "megatron.core.jit"

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.NAME:
            return None
        import importlib.machinery
        import sys

        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_then_disable(module: types.ModuleType) -> None:
            run(module)
            disable = getattr(module, "disable_jit_fuser", None)
            if callable(disable):
                disable()

        spec.loader.exec_module = exec_then_disable  # this spec's own loader instance
        return spec


def skip_jit_fuser() -> bool:
    """On CPU, keep megatron-core's JIT fuser off from its import on; call before megatron-core
    is imported (entry points do it first). Returns True when the hook is in place.

    ``megatron.core.jit`` sets ``jit_fuser = torch.compile``, and a dozen megatron-core modules
    decorate functions with it while they are imported: the first decoration imports
    ``torch._dynamo`` and ``torch._inductor``, about 1.6 CPU-s of every start. Without CUDA none
    of the decorated functions runs (:meth:`ModelArgs.transformer_config` sets ``bias_activation_fusion`` and
    ``bias_dropout_fusion`` only with CUDA, and no other decorated function is on our models'
    path); with megatron-core's ``disable_jit_fuser()`` they stay plain Python functions, which
    compute the same. On a CUDA machine, or once ``megatron.core.jit`` is imported, nothing
    changes (returns False)."""
    import sys

    if torch.cuda.is_available() or _JitFuserOffFinder.NAME in sys.modules:
        return False
    if not any(isinstance(f, _JitFuserOffFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _JitFuserOffFinder())
    return True


def _check_version() -> str:
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version not in SUPPORTED_MEGATRON_VERSIONS:
        raise CpuShimError(
            f"megatron_gad's CPU shims were written for megatron-core "
            f"{', '.join(SUPPORTED_MEGATRON_VERSIONS)} but {version} is installed; running "
            f"megatron-core on CPU with another version is untested. Install "
            f"megatron-core=={SUPPORTED_MEGATRON_VERSIONS[-1]} or run on a CUDA machine."
        )
    return version


def apply() -> bool:
    """Apply every CPU shim once. Returns True if shims are active, False on a CUDA machine.

    Called by :func:`megatron_gad.runtime.distributed.init_distributed`; call it yourself before
    building megatron-core models outside that path. Safe to call repeatedly.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    version = _check_version()

    # GlobalMemoryBuffer.get_tensor (utils), gather_from_tensor_model_parallel_region and friends
    # (tensor_parallel/mappings), p2p receive buffers (pipeline_parallel/p2p_communication), the
    # DDP grad buffers (distributed/param_and_grad_buffer) and the dist_checkpointing writer all
    # allocate on torch.cuda.current_device().
    torch.cuda.current_device = _cpu_current_device
    # batched p2p (p2p_communication._batched_p2p_ops with batch_p2p_sync) and the
    # dist_checkpointing filesystem writer / async finalize call torch.cuda.synchronize().
    torch.cuda.synchronize = _no_op
    # LanguageModule.setup_embeddings_and_output_layer moves the tied word embedding with
    # weight.data.cuda() before its all-reduce across the first and last pipeline stage.
    torch.Tensor.cuda = _tensor_cuda_identity

    view = _CpuTorchView()
    for name in _CUDA_LITERAL_MODULES:
        importlib.import_module(name).torch = view

    # MegatronOptimizer.clip_grad_norm -> clip_grad_by_total_norm_fp32 asserts CUDA grads.
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu

    # Activation recompute (CheckpointFunction.forward/backward and _fork_rng) saves and restores
    # the CUDA generator's state through these two module-level functions.
    rng = importlib.import_module("megatron.core.tensor_parallel.random")
    rng._get_all_rng_states = _get_all_rng_states_cpu
    rng._set_all_rng_states = _set_all_rng_states_cpu

    # dist_checkpointing.save (torch_dist strategy, also when synchronous) spawns a Manager
    # process for its results queue and forks one writer process per bucket: on a CPU run of a
    # small model that costs more CPU time than the write itself (a fresh interpreter, and
    # copying the page tables of a large process). Write in this process instead.
    filesystem_async = importlib.import_module("megatron.core.dist_checkpointing.strategies.filesystem_async")
    filesystem_async._get_write_results_queue = _in_process_results_queue
    filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_write_buckets_in_process)

    _applied = True
    logger.debug("megatron-core %s CPU shims applied", version)
    return True
