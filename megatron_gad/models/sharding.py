"""Full (TP=1, PP=1) tensors from a stage's TP-sharded Megatron parameters, under global names.

Shared by the parity tests, the weight exporter and the converters: a local parameter name such as
``decoder.layers.1.mlp.linear_fc1.weight`` on pipeline stage 1 of 2 (4 layers) becomes the global
``decoder.layers.3.mlp.linear_fc1.weight``, and its TP shards are all-gathered along the
parameter's partition dimension. The fused SwiGLU ``linear_fc1`` is the one layout where a plain
concatenation is wrong: each TP shard holds ``[gate_i; up_i]`` and the full tensor is
``[gate_0 .. gate_n; up_0 .. up_n]``.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything with ``.module``)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_name(local_name: str, layer_offset: int) -> str:
    """Shift the transformer-layer index in ``local_name`` by this stage's ``layer_offset``."""
    return _LAYER.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + layer_offset}.", local_name, count=1)


def layer_offset(model: torch.nn.Module) -> int:
    """Index of this stage's first transformer layer in the whole model (0 on stage 0)."""
    for module in model.modules():
        if hasattr(module, "layer_number") and hasattr(module, "self_attention"):
            return int(module.layer_number) - 1
    return 0


def is_tp_sharded(param: Tensor) -> bool:
    """True for parameters that Megatron splits across TP ranks."""
    return bool(getattr(param, "tensor_model_parallel", False))


def is_fused_fc1(name: str) -> bool:
    """True for MLP ``linear_fc1`` weights and biases: ``[gate; up]`` fused along the output
    dimension, so each TP shard holds ``[gate_t; up_t]`` (halves interleaved across ranks)."""
    return name.endswith(("linear_fc1.weight", "linear_fc1.bias"))


def gather_tp(local: Tensor, param: Tensor, name: str, group: dist.ProcessGroup | None) -> Tensor:
    """All-gather ``local`` (a shard of ``param``, or its gradient) over the TP ``group``.

    Collective over the TP group: every TP rank of the stage must call it for the same ``name``
    in the same order. Replicated tensors are returned unchanged.
    """
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1 or not is_tp_sharded(param):
        return local
    dim = int(param.partition_dim)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if is_fused_fc1(name):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def full_tensors(
    chunk: torch.nn.Module,
    select: Callable[[Tensor], Tensor | None] = lambda p: p.detach(),
    skip: Callable[[str], bool] = lambda name: False,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(global_megatron_name, full_tensor)`` for this stage's parameters, TP-gathered.

    ``select(param)`` picks what to gather (the parameter by default; for example
    ``lambda p: p.main_grad`` for gradients) and may return None to skip a parameter. Every TP
    rank of the stage must iterate in lockstep (collective). Ranks: all ranks of a stage.
    """
    from megatron.core import parallel_state as ps

    model = unwrap(chunk)
    offset = layer_offset(model)
    group = ps.get_tensor_model_parallel_group()
    for name, param in model.named_parameters():
        if skip(name):
            continue
        tensor = select(param)
        if tensor is None:
            continue
        yield global_name(name, offset), gather_tp(tensor, param, name, group)
