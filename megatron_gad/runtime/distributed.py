"""Process-group and Megatron parallel-state set-up for CPU (gloo) and GPU (nccl) runs.

Every rank calls :func:`init_distributed` once, after torchrun (or
:func:`megatron_gad.runtime.spawn.run_distributed`) has set ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. A single process without those variables runs as a world of
one. Data parallelism is whatever the world size leaves after tensor and pipeline parallelism.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_gad.errors import UserError
from megatron_gad.runtime import cpu_shims


class ParallelLayoutError(UserError, ValueError):
    """TP x PP does not divide the number of processes started."""


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


def device() -> torch.device:
    """The device this process computes on: its local CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_THREADS_REPORTED = False


def configure_threads(environ: dict[str, str] | None = None, announce: bool = True) -> int | None:
    """Torch's intra-op threads: the cores this process may use divided by the ranks on this
    machine (``LOCAL_WORLD_SIZE``), at least 1, unless ``OMP_NUM_THREADS`` is set (then the
    user's choice stands and None is returned). Oversubscribed threads make a loaded CPU run
    many times slower. The choice is printed once per process, by local rank 0."""
    global _THREADS_REPORTED
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    if announce and not _THREADS_REPORTED and env.get("LOCAL_RANK", "0") == "0":
        print(f"[megatron_gad] torch intra-op threads: {threads} per rank ({cores} cores / {local} local ranks; "
              f"set OMP_NUM_THREADS to choose)", flush=True)
    _THREADS_REPORTED = True
    return threads


def init_distributed(
    tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: float = 600.0
) -> ParallelInfo:
    """Initialise torch.distributed and Megatron's parallel_state on every rank.

    Uses nccl when CUDA is available (binding ``LOCAL_RANK``'s GPU), gloo with the CPU shims
    otherwise, and sets torch's intra-op threads (:func:`configure_threads`). Raises ValueError when ``tp * pp`` does not divide the world size. Idempotent for
    identical sizes; call :func:`destroy_distributed` before re-initialising with other sizes.
    """
    from megatron.core import parallel_state as ps

    cuda = torch.cuda.is_available()
    configure_threads()
    if not cuda:
        cpu_shims.apply()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ParallelLayoutError(
            f"tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} must divide "
            f"the world size {world}"
        )
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
            raise RuntimeError("parallel state already initialised with other sizes")
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    set_seed(seed)
    return parallel_info()


def parallel_info() -> ParallelInfo:
    """Describe this rank's place in the grid (after :func:`init_distributed`)."""
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank, and Megatron's TP RNG tracker.

    On GPU the tracker gives each TP rank its own stream for dropout inside TP regions. On CPU
    there is no CUDA RNG to track: the tracker falls back to the default generator, so dropout
    is not decorrelated across TP ranks there (keep dropout at 0 on CPU; our configs do).
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(
            seed, inference_rng_tracker=True, force_reset_rng=True
        )


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the default process group (every rank)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
