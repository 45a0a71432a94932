"""Run a function on N local gloo ranks with a hard timeout: for tests, benchmarks and tools.

Ranks are forked (no pickling of the function, so closures and test-local functions work), each
initialises torch.distributed and Megatron's parallel state, runs the function, and hands its
(picklable, CPU) result back through a file. The first rank to fail, or the deadline, tears every
rank down at once, so a failing rank never leaves its peers blocked in a collective.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
import time
import traceback
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


class RankFailure(RuntimeError):
    """A spawned rank raised; the message carries that rank's traceback."""


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    tp: int,
    pp: int,
    seed: int,
    out_dir: str,
    args: tuple,
    kwargs: dict,
) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        from megatron_gad.runtime.distributed import destroy_distributed, init_distributed

        init_distributed(tp=tp, pp=pp, seed=seed, timeout_s=120)
        result = fn(*args, **kwargs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        destroy_distributed()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        _reap_children()
        os._exit(1)
    _reap_children()
    os._exit(0)


def _reap_children() -> None:
    """Kill this rank's child processes before it exits: megatron-core's checkpoint writer keeps a
    worker (and multiprocessing's resource tracker) alive, which ``os._exit`` would orphan."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=5)


def run_distributed(
    fn: Callable[..., T],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    timeout_s: float = 180.0,
    args: tuple = (),
    kwargs: dict | None = None,
) -> list[T]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked gloo ranks; return each rank's result.

    Raises RankFailure with the failing rank's traceback, or TimeoutError naming the ranks still
    running after ``timeout_s``; in both cases every rank is killed first. The rendezvous port is
    picked free, then released for rank 0 to bind: another process on the host (a second test
    session) can take it in between, so a start that fails with the port in use is retried on a
    new one (up to ``_PORT_ATTEMPTS`` in all).
    """
    from megatron_gad.runtime.distributed import _free_port

    for attempt in range(1, _PORT_ATTEMPTS + 1):
        try:
            return _run_once(fn, world_size, _free_port(), tp, pp, seed, timeout_s, args, kwargs)
        except RankFailure as exc:
            if _PORT_IN_USE not in str(exc) or attempt == _PORT_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


#: Starts tried by :func:`run_distributed`, and the error name of a rendezvous port already bound.
_PORT_ATTEMPTS = 3
_PORT_IN_USE = "EADDRINUSE"


def _run_once(fn: Callable[..., T], world_size: int, port: int, tp: int, pp: int, seed: int, timeout_s: float,
              args: tuple, kwargs: dict | None) -> list[T]:
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="mgad_spawn_") as out_dir:
        procs = [
            ctx.Process(
                target=_child,
                args=(fn, r, world_size, port, tp, pp, seed, out_dir, args, kwargs or {}),
                daemon=False,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        _wait_all(procs, out_dir, timeout_s)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def _wait_all(procs: list, out_dir: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            codes = [p.exitcode for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                raise RankFailure(_failure_message(failed, codes, out_dir))
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                running = [r for r, c in enumerate(codes) if c is None]
                raise TimeoutError(f"ranks {running} still running after {timeout_s:.0f}s")
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join()


def _failure_message(failed: list[int], codes: list, out_dir: str) -> str:
    parts = []
    for r in failed:
        path = os.path.join(out_dir, f"rank{r}.err")
        detail = open(path).read() if os.path.exists(path) else f"exit code {codes[r]} (no traceback)"
        parts.append(f"--- rank {r} ---\n{detail}")
    return "spawned rank(s) failed:\n" + "\n".join(parts)
