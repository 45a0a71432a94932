"""Wrap a role's model in Megatron's DDP and build its Megatron optimizer (Adam, grad clipping).

Called on every rank. bf16 params with fp32 main grads and master weights on GPU; fp32 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from megatron_gad.runtime.distributed import device


@dataclass
class OptimConfig:
    """Optimizer settings of one role (``actor_rollout_ref.actor.optim`` / ``critic.optim``)."""

    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    lr_warmup_steps: int = 0
    """Linear warm-up to ``lr`` over this many training steps of the role (the actor's count
    from its first policy-loss step). 0 or -1 (verl's "unset"): ``lr_warmup_steps_ratio`` decides."""
    lr_warmup_steps_ratio: float = 0.0
    """verl's key: when ``lr_warmup_steps`` <= 0, warm up over ``int(ratio * total steps)`` steps
    (the run's ``total_steps``, as verl counts them)."""

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where.<field>`` for an invalid value."""
        if self.lr < 0:
            raise ValueError(f"{where}.lr must be >= 0, got {self.lr}")
        if self.clip_grad < 0:
            raise ValueError(f"{where}.clip_grad must be >= 0, got {self.clip_grad}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{where}.betas must lie in [0, 1), got {self.betas}")
        if not 0.0 <= self.lr_warmup_steps_ratio <= 1.0:
            raise ValueError(f"{where}.lr_warmup_steps_ratio must lie in [0, 1], got {self.lr_warmup_steps_ratio}")
        if self.lr_warmup_steps < -1:
            raise ValueError(f"{where}.lr_warmup_steps must be >= -1, got {self.lr_warmup_steps}")


def build_model(provider: Callable[[bool, bool], torch.nn.Module], config: Any) -> list[torch.nn.Module]:
    """Build this rank's stage with ``provider(pre_process, post_process)`` and wrap it in DDP.

    Returns a one-element list of model chunks (the form Megatron's schedules take; virtual
    pipeline stages are not used). Gradients land in fp32 ``main_grad`` buffers and are
    all-reduced over the data-parallel group by ``finalize_model_grads``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    model = provider(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    model.to(device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=False,
        check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # The pipeline schedules reduce gradients through these hooks after the last micro-batch.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return [ddp]


def build_optimizer(chunks: list[torch.nn.Module], optim: OptimConfig, config: Any):
    """Megatron optimizer (Adam) over ``chunks``; mixed precision with fp32 master weights when
    the model is bf16/fp16, plain fp32 otherwise. Clipping uses the global norm over TP/PP."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=False,
    )
    return get_megatron_optimizer(opt_config, chunks)


def warmup_steps(optim: OptimConfig, total_steps: int | None = None) -> int:
    """Length of the linear warm-up: ``lr_warmup_steps`` when > 0, else
    ``int(lr_warmup_steps_ratio * total_steps)`` (verl's rule; 0 without ``total_steps``)."""
    if optim.lr_warmup_steps > 0:
        return optim.lr_warmup_steps
    return int(optim.lr_warmup_steps_ratio * total_steps) if total_steps else 0


def warmup_lr(optim: OptimConfig, steps_done: int, total_steps: int | None = None) -> float:
    """The learning rate after ``steps_done`` training steps of the linear warm-up (its length:
    :func:`warmup_steps`)."""
    steps = warmup_steps(optim, total_steps)
    if steps <= 0:
        return optim.lr
    return optim.lr * min(1.0, (steps_done + 1) / steps)


def set_lr(optimizer: Any, lr: float) -> None:
    """Set the learning rate of every parameter group (warm-up schedules call this per step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
