"""The launcher tears ranks down on failure, and the CPU shims refuse unknown megatron-core."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from megatron_gad.runtime import cpu_shims
from megatron_gad.runtime.spawn import RankFailure, run_distributed


def _rank1_fails_rank0_blocks() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.all_reduce(torch.ones(1))  # would block forever without teardown


def test_failing_rank_does_not_hang_peers() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailure, match="boom on rank 1"):
        run_distributed(_rank1_fails_rank0_blocks, 2, timeout_s=60)
    assert time.monotonic() - start < 30


def test_deadline_kills_every_rank() -> None:
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\]"):
        run_distributed(time.sleep, 2, timeout_s=3, args=(60,))


def test_grid_sizes_and_bad_layout() -> None:
    from megatron_gad.runtime import parallel_info

    infos = run_distributed(parallel_info, 4, tp=2, pp=2)
    assert [(i.tp_rank, i.pp_rank, i.dp) for i in infos] == [(0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    with pytest.raises(RankFailure, match="must divide the world size 2"):
        run_distributed(lambda: None, 2, tp=4, timeout_s=60)


def test_shims_refuse_unknown_megatron_version(monkeypatch) -> None:
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(cpu_shims.CpuShimError, match="0.99.0"):
        cpu_shims._check_version()


def test_cpu_clip_scales_like_megatron() -> None:
    grads = [torch.full((3,), 3.0), torch.full((2,), 4.0)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = float(torch.cat(grads).norm())
    cpu_shims._clip_grad_by_total_norm_cpu(params, 1.0, total)
    assert abs(float(torch.cat([p.grad for p in params]).norm()) - 1.0) < 1e-5


def test_threads_follow_the_cores_per_local_rank_unless_omp_is_set(capsys) -> None:
    import os

    from megatron_gad.runtime.distributed import configure_threads

    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        assert configure_threads({"OMP_NUM_THREADS": "3"}) is None  # the user's choice stands
        assert torch.get_num_threads() == before
        assert configure_threads({"LOCAL_WORLD_SIZE": "1"}) == cores == torch.get_num_threads()
        assert configure_threads({"LOCAL_WORLD_SIZE": str(4 * cores)}) == 1 == torch.get_num_threads()
        assert capsys.readouterr().out.count("torch intra-op threads") <= 1  # printed once per process
    finally:
        torch.set_num_threads(before)
