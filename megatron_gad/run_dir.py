"""Claiming a run directory (``trainer.default_local_dir``) before any model is built.

One run per directory: rank 0 takes the directory's lock (:class:`~megatron_gad.runtime.preemption.RunLock`),
removes checkpoints a killed save left incomplete and picks the checkpoint to resume from (the
newest intact one; each damaged one is named in a warning). Every rank gets rank 0's decision, or
raises the same :class:`~megatron_gad.checkpoint.CheckpointError`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch.distributed as dist

from megatron_gad import checkpoint as ckpt
from megatron_gad.config import TrainConfig
from megatron_gad.errors import UserError


def _warn0(line: str | None) -> None:
    if line and dist.get_rank() == 0:
        print(f"[megatron_gad] warning: {line}", file=sys.stderr, flush=True)


def claim_run_dir(cfg: TrainConfig) -> tuple[Any, str | None]:
    """Start the process groups, then (collective) lock ``cfg.trainer.default_local_dir`` on rank 0
    and decide the resume. Returns (the lock on rank 0 or None, the checkpoint to resume from or
    None)."""
    from megatron_gad.runtime import init_distributed
    from megatron_gad.runtime.preemption import RunLock, stop_with_launcher

    stop_with_launcher()
    layout, t = cfg.actor_rollout_ref.megatron, cfg.trainer
    init_distributed(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, seed=t.seed)
    lock, decision = None, None
    if dist.get_rank() == 0:
        try:
            lock = RunLock(t.default_local_dir)
            for line in [lock.acquire()] + [f"removed incomplete checkpoint {p}"
                                            for p in ckpt.clean_incomplete(t.default_local_dir)]:
                _warn0(line)
            notes: list[str] = []
            decision = ("resume", ckpt.resolve_resume(t.default_local_dir, t.resume_mode, notes))
            for line in notes:
                _warn0(line)
            saved = ckpt.saved_world_size(decision[1]) if decision[1] else None
            if saved not in (None, dist.get_world_size()):
                _warn0(f"{decision[1]} was saved by {saved} ranks, this run has {dist.get_world_size()}: "
                       f"the RNG streams restart from trainer.seed (the continuation is not bit-identical)")
        except UserError as exc:
            if lock is not None:
                lock.release()
            decision = ("error", exc)
    box = [decision if decision is None or decision[0] == "resume" else ("error", str(decision[1]))]
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        if dist.get_rank() == 0:
            raise decision[1]
        raise ckpt.CheckpointError(box[0][1])
    return lock, box[0][1]
