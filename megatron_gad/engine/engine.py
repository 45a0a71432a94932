"""One role's model on Megatron's pipeline schedule: model chunks, DDP, optimizer, metrics.

:class:`RoleEngine` is shared by the actor and the critic engines. It runs a list of equally
sized micro-batches through ``get_forward_backward_func()`` (forward-only for inference, with
backward and grad finalisation for training), steps the optimizer, and reduces metrics once per
mini-batch.

Normalisation contract (why gradients do not depend on the layout): a loss function computes its
micro-batch's share of the MINI-BATCH loss with the GLOBAL normaliser (token or sequence count
summed over all micro-batches and data-parallel ranks, see :func:`metrics.global_count`), so the shares
sum to the full mini-batch loss. Megatron divides a ``(loss, metrics)`` return by the number of
micro-batches and DDP averages gradients over DP (scales by ``1 / dp``); :meth:`RoleEngine.loss_scale`
multiplies by ``num_microbatches * dp`` to undo both.

All public methods are called by EVERY rank (all TP ranks, PP stages and DP replicas) in lockstep.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import Any, Callable

import torch
from torch import Tensor

from megatron_gad.engine.batch import model_inputs, pad_responses, split_rows, trim_padding
from megatron_gad.engine.forward_step import make_forward_step
from megatron_gad.engine.reduce import _ps, broadcast_from_last_stage
from megatron_gad.models.build import OptimConfig, build_model, build_optimizer
from megatron_gad.runtime.distributed import device


class RoleEngine:
    """Model chunks (+ optimizer) of one role and the pipeline-schedule plumbing.

    Build with :meth:`build`. ``optimizer`` None makes a frozen, inference-only engine (for
    example the reference policy). ``config`` is this engine's own copy of the
    ``TransformerConfig`` (``build_model`` installs the DDP hooks on it).
    """

    def __init__(self, chunks: list[torch.nn.Module], config: Any, optimizer: Any | None = None) -> None:
        self.chunks = chunks
        self.config = config
        self.optimizer = optimizer

    @classmethod
    def build(cls, provider: Callable[[Any, bool, bool], torch.nn.Module], config: Any,
              optim: OptimConfig | None, **kwargs: Any) -> "RoleEngine":
        """Build this rank's stage with ``provider(config, pre_process, post_process)``; with an
        ``optim`` wrap it in DDP and build its optimizer, without one build a frozen inference
        model (plain module, ``requires_grad`` off: no gradient buffers). All ranks call it."""
        config = copy.copy(config)  # per-engine DDP hooks (no_sync_func, finalize_model_grads_func)
        if optim is None:  # frozen: no DDP wrapper, no gradient buffers, no autograd state
            ps = _ps()
            model = provider(config, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()).to(device())
            model.requires_grad_(False)
            return cls([model], config, None, **kwargs)
        chunks = build_model(lambda pre, post: provider(config, pre, post), config)
        optimizer = build_optimizer(chunks, optim, config)
        # The schedule multiplies each loss by this before backward (fp16 loss scaling; 1 otherwise).
        config.grad_scale_func = optimizer.scale_loss
        return cls(chunks, config, optimizer, **kwargs)

    @property
    def dp(self) -> int:
        """Data-parallel size."""
        return _ps().get_data_parallel_world_size()

    @staticmethod
    def is_last_stage() -> bool:
        """True on the last pipeline stage (where losses and outputs live)."""
        return _ps().is_pipeline_last_stage()

    def loss_scale(self, num_microbatches: int) -> float:
        """Factor a loss share is multiplied by: undoes the schedule's ``/ num_microbatches`` and
        DDP's ``/ dp`` (see the module docstring)."""
        return float(num_microbatches * self.dp)

    def run_schedule(self, micro_batches: list[Any], loss_func: Callable, *, forward_only: bool) -> None:
        """Run the micro-batches (equal shapes) through Megatron's schedule with
        ``loss_func(micro_batch, output)`` on the last stage; with ``forward_only`` False the
        gradients are accumulated and finalised (DP all-reduce, tied-embedding sync) in the
        ``main_grad`` buffers. Columns that are padding in every row are cut first
        (:func:`~megatron_gad.engine.batch.trim_padding`): outputs per response token reach
        ``loss_func`` as wide as the longest response of these micro-batches, or, with one
        pipeline stage (no activations are sent between stages, so shapes may differ), of each
        micro-batch alone."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.own_shapes():
            micro_batches = [trim_padding([m])[0] for m in micro_batches]
        else:
            micro_batches = trim_padding(micro_batches)
        rows, seq_length = model_inputs(micro_batches[0])[0].shape  # unused by the schedule at PP = 1

        for chunk in self.chunks:
            chunk.train(not forward_only)
        context = torch.no_grad() if forward_only else contextlib.nullcontext()
        with context:
            get_forward_backward_func()(
                forward_step_func=make_forward_step(loss_func), data_iterator=iter(micro_batches), model=self.chunks,
                num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=rows,
                forward_only=forward_only,
            )

    @staticmethod
    def own_shapes() -> bool:
        """Each micro-batch may keep its own shape: one pipeline stage (Megatron's schedule sends
        activations of one fixed shape between stages)."""
        return _ps().get_pipeline_model_parallel_world_size() == 1

    def infer(self, batch: Any, collect: Callable, micro_batch_size: int, what: str,
              out_shape: tuple[int, ...]) -> Tensor:
        """Forward-only pass over ``batch`` in micro-batches of ``micro_batch_size`` rows;
        ``collect(out_list, micro_batch, output)`` appends each micro-batch's result on the last
        stage; the concatenation (``out_shape``, float32) is returned on EVERY stage, on the CPU
        (the trainer's experience lives on the host; micro-batches move to the device one at a
        time). Per-response-token outputs are zero beyond the longest response of the
        batch (the columns :meth:`run_schedule` trims). ``what`` names the micro-batch setting
        in errors."""
        micro = split_rows(batch, micro_batch_size, what)
        out: list[Tensor] = []
        self.run_schedule(micro, functools.partial(collect, out), forward_only=True)
        return self.share_outputs(out, out_shape)

    def share_outputs(self, out: list[Tensor], out_shape: tuple[int, ...]) -> Tensor:
        """The last stage's per-micro-batch results ``out``, concatenated (float32
        ``out_shape``; per-response-token results padded back to the untrimmed width), on EVERY
        stage, on the CPU."""
        if self.is_last_stage():  # per response token: each piece back to the untrimmed width
            result = torch.cat([pad_responses(piece, out_shape[1]) if piece.dim() > 1 else piece for piece in out]).float()
        else:
            result = torch.zeros(out_shape, dtype=torch.float32, device=device())
        return broadcast_from_last_stage(result).cpu()

    def zero_grad(self) -> None:
        """Clear gradient buffers before a mini-batch."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.require_optimizer().zero_grad()

    def train_step(self, micro_batches: list[Any], loss_func: Callable, acc: Any, role: str) -> dict[str, float]:
        """One optimizer step over ``micro_batches``: clear grads, forward/backward through the
        schedule, reduce the metrics of ``acc`` (identical on every rank), then step, unless a
        metric is non-finite: then the update is skipped on every rank alike. Adds
        ``<role>/grad_norm``, ``<role>/lr`` and ``<role>/update_skipped``."""
        self.zero_grad()
        self.run_schedule(micro_batches, loss_func, forward_only=False)
        metrics = acc.reduce()
        finite = all(math.isfinite(v) for v in metrics.values())
        if finite:
            step = self.optimizer_step()
        else:
            step = {"grad_norm": float("nan"), "lr": float(self.require_optimizer().param_groups[0]["lr"])}
        metrics.update({f"{role}/grad_norm": step["grad_norm"], f"{role}/lr": step["lr"],
                        f"{role}/update_skipped": 0.0 if finite else 1.0})
        return metrics

    def optimizer_step(self) -> dict[str, float]:
        """Clip and step; returns ``grad_norm`` (global over TP/PP/DP) and ``lr``."""
        optimizer = self.require_optimizer()
        _, grad_norm, _ = optimizer.step()
        if grad_norm is None:  # no clipping configured: the norm is still worth reporting
            grad_norm = optimizer.get_grad_norm()
        lr = optimizer.param_groups[0]["lr"]
        return {"grad_norm": float(grad_norm), "lr": float(lr)}

    def require_optimizer(self) -> Any:
        """The optimizer; a frozen engine raises RuntimeError (it cannot train)."""
        if self.optimizer is None:
            raise RuntimeError(f"{type(self).__name__} was built without an optimizer (frozen); it cannot train")
        return self.optimizer
