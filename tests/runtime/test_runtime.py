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


def _world_size() -> int:
    return dist.get_world_size()


def test_a_rendezvous_port_taken_before_rank_0_binds_it_is_retried(monkeypatch) -> None:
    """The free port run_distributed picks is released before rank 0 binds it; when another
    process holds it by then (here: a listening socket), the start is retried on a new port."""
    import socket

    from megatron_gad.runtime import distributed

    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("0.0.0.0", 0))
    blocker.listen()
    picked = [blocker.getsockname()[1]]
    real = distributed._free_port
    monkeypatch.setattr(distributed, "_free_port", lambda: picked.pop() if picked else real())
    try:
        assert run_distributed(_world_size, 2, timeout_s=60) == [2, 2]
    finally:
        blocker.close()
    assert not picked  # the taken port was tried first


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


def test_threads_follow_the_cores_per_local_rank_unless_omp_is_set(capsys, monkeypatch) -> None:
    import os

    from megatron_gad.runtime import distributed
    from megatron_gad.runtime.distributed import configure_threads

    def printed() -> int:
        return capsys.readouterr().out.count("torch intra-op threads")

    monkeypatch.setattr(distributed, "_THREADS_REPORTED", False)  # as in a fresh process
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        assert configure_threads({"OMP_NUM_THREADS": "3"}) is None  # the user's choice stands
        assert torch.get_num_threads() == before and printed() == 0  # nothing chosen, nothing said
        assert configure_threads({"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == max(1, cores // 2)
        assert printed() == 0  # only local rank 0 says it
        monkeypatch.setattr(distributed, "_THREADS_REPORTED", False)  # a fresh local rank 0
        assert configure_threads({"LOCAL_WORLD_SIZE": "1"}) == cores == torch.get_num_threads()
        assert printed() == 1  # its first choice is said
        assert configure_threads({"LOCAL_WORLD_SIZE": str(4 * cores)}) == 1 == torch.get_num_threads()
        assert printed() == 0  # printed once per process
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the hook is for CPU-only machines")
def test_jit_fuser_is_off_from_megatron_cores_import_on_without_cuda() -> None:
    """skip_jit_fuser() before megatron-core's import: megatron-core's own disable_jit_fuser()
    runs as megatron.core.jit loads, so no module decorates with torch.compile and torch's
    compiler stack (torch._inductor) is never imported; once megatron.core.jit is loaded the
    call changes nothing."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from megatron_gad.runtime.cpu_shims import skip_jit_fuser\n"
        "assert skip_jit_fuser()\n"
        "import megatron.core.transformer.transformer_config\n"
        "import megatron.core.jit as jit\n"
        "from megatron.core.fusions.fused_bias_swiglu import bias_swiglu\n"
        "print(jit.jit_fuser is jit.noop_decorator, bias_swiglu.__code__.co_filename.endswith('fused_bias_swiglu.py'),\n"
        "      'torch._inductor' in sys.modules,\n"
        "      skip_jit_fuser())\n"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "False", "False"]  # plain functions, no compiler stack
