"""Resharding plan: Megatron TP x PP shards straight into the shards of a rollout engine at another TP.

Today's weight sync gathers every full tensor onto one rank and hands HF-named full tensors to
one engine. An engine with tensor parallelism ``T`` on every GPU of a replica (see
``docs/scaling.md``) needs, on its rank ``r``, only the slices vLLM's parallel layers keep there.
:func:`plan_resharding` computes, from the exporter's parameter list
(:meth:`WeightExporter.metadata`, global names and full shapes), which contiguous block of which
local Megatron shard (pipeline stage, TP rank) lands where in which rollout rank's HF-named shard,
so each rollout rank can pull exactly its bytes from the ranks that hold them (locally when they
are the same GPU) and no rank ever holds a full tensor.

Megatron side (TP ``t``, :mod:`models.sharding`): ``linear_qkv`` rows are split by query group,
each group ``[q_g, k_g, v_g]``; ``linear_fc1`` holds ``[gate_s; up_s]`` on TP rank ``s``;
``linear_proj`` and ``linear_fc2`` are split by columns; the word embedding and output layer by
rows of the padded vocabulary (``models.transformer.VOCAB_PAD_MULTIPLE``); norms are replicated.

Rollout side (vLLM's layers, read in its source, ``model_executor/layers/linear.py`` and
``vocab_parallel_embedding.py``): rank ``r`` of ``T`` holds rows ``[r n/T, (r+1) n/T)`` of
``q_proj``, ``gate_proj`` and ``up_proj`` (and biases); of ``k_proj``/``v_proj`` the same when
``T`` <= the KV heads, otherwise KV head ``r // (T / kv_heads)`` (heads replicated); columns
``[r n/T, (r+1) n/T)`` of ``o_proj`` and ``down_proj``; rows ``[r P, (r+1) P)`` of the
vocabulary padded to a multiple of 64 (``P`` = padded / T; padding rows stay zero) of
``embed_tokens`` and ``lm_head``; every norm whole.

:func:`assemble` executes a plan for one rollout rank from local shards (what a pull from each
source rank would deliver); :func:`full_from_shards` inverts the rollout sharding, which the tests
use to check a plan bit for bit against the TP=1 export. :meth:`ReshardPlan.bytes_between` sizes
the traffic per (source, destination) pair for the cost model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from megatron_gad.models.hf_mapping import hf_shape, hf_sources
from megatron_gad.models.transformer import ModelArgs, model_args_from_hf
from megatron_gad.rollout.weight_export import ParamMeta

VLLM_VOCAB_PADDING = 64
"""vLLM's ``DEFAULT_VOCAB_PADDING_SIZE``: its embedding and LM head pad the vocabulary to this."""

_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_HF_ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


class ReshardError(ValueError):
    """A layout the plan cannot map (sizes that do not divide, an unknown tensor)."""


@dataclass(frozen=True)
class Piece:
    """Copy ``length`` slices along ``dim`` from a local Megatron shard into a rollout shard."""

    hf_name: str
    dst_rank: int
    dst_start: int
    src_name: str
    src_stage: int
    src_tp: int
    src_start: int
    length: int
    dim: int


@dataclass
class ReshardPlan:
    """All pieces from a Megatron (TP ``src_tp`` x PP ``pp``) layout into rollout TP ``dst_tp``."""

    src_tp: int
    pp: int
    dst_tp: int
    pieces: list[Piece] = field(default_factory=list)
    shapes: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)
    """``(hf_name, dst_rank) -> shape`` of the rollout shard."""
    src_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Global Megatron name -> shape of one local shard."""

    def pieces_for(self, dst_rank: int) -> list[Piece]:
        return [p for p in self.pieces if p.dst_rank == dst_rank]

    def bytes_between(self, itemsize: int) -> dict[tuple[tuple[int, int], int], int]:
        """Bytes each ``(src_stage, src_tp)`` sends to each rollout rank: ``{((stage, tp), dst): n}``."""
        out: dict[tuple[tuple[int, int], int], int] = {}
        for p in self.pieces:
            shape = list(self.src_shapes[p.src_name])
            shape[p.dim] = p.length
            n = itemsize
            for s in shape:
                n *= s
            key = ((p.src_stage, p.src_tp), p.dst_rank)
            out[key] = out.get(key, 0) + n
        return out


def _split(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ReshardError(f"reshard: {what} ({n}) is not divisible by {parts}")
    return n // parts


def _runs(values: list[Tensor]) -> list[tuple[int, int]]:
    """Maximal runs ``[start, stop)`` of indices along which every key column is constant except
    the position columns (the last two), which step by exactly 1; rows with a negative first key
    (padding) are dropped."""
    n = values[0].numel()
    if n == 0:
        return []
    brk = torch.zeros(n, dtype=torch.bool)
    brk[0] = True
    for key in values[:-2]:
        brk[1:] |= key[1:] != key[:-1]
    for pos in values[-2:]:
        brk[1:] |= (pos[1:] - pos[:-1]) != 1
    starts = torch.nonzero(brk).flatten().tolist() + [n]
    keep = values[0]
    return [(a, b) for a, b in zip(starts[:-1], starts[1:]) if int(keep[a]) >= 0]


def plan_resharding(metas: Iterable[ParamMeta], hf_config: Any, src_tp: int, pp: int, dst_tp: int,
                    role: str = "actor", args: ModelArgs | None = None) -> ReshardPlan:
    """The plan for the parameters ``metas`` (from :meth:`WeightExporter.metadata`: global name,
    full shape, owning stage) of a Megatron model at TP ``src_tp`` x PP ``pp`` into a rollout
    engine at TP ``dst_tp``. ``args``: ``model_args_from_hf(hf_config)`` when the caller has it.
    Raises ReshardError for sizes that do not divide. Pure arithmetic: any rank may call it, no
    process group is used. At ``dst_tp=1`` the pieces are what the weight exporter's ``direct``
    transport sends (the real vocabulary rows only; the padded shard shape is vLLM's)."""
    if role != "actor":
        raise ReshardError("reshard: only the actor feeds a rollout engine")
    if src_tp < 1 or pp < 1 or dst_tp < 1:
        raise ReshardError(f"reshard: sizes must be >= 1, got src_tp={src_tp} pp={pp} dst_tp={dst_tp}")
    args = args or model_args_from_hf(hf_config)
    if dst_tp > args.groups and dst_tp % args.groups:
        raise ReshardError(f"reshard: rollout TP {dst_tp} must divide or be a multiple of the {args.groups} KV heads")
    _split(args.heads, dst_tp, "attention heads at the rollout TP")
    _split(args.ffn, dst_tp, "the MLP width at the rollout TP")
    vocab_padded = -(-args.vocab // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    vocab_rows = _split(vocab_padded, dst_tp, f"the vocabulary padded to {VLLM_VOCAB_PADDING}")
    plan = ReshardPlan(src_tp=src_tp, pp=pp, dst_tp=dst_tp)
    for meta in metas:
        sources, how = hf_sources(meta.name, hf_config, role, args)
        if how == "none":
            continue
        rest = re.sub(r"^decoder\.layers\.\d+\.", "", meta.name)
        full = list(meta.shape)
        if how == "copy" and rest not in _ROW_PARALLEL:  # replicated on both sides
            plan.src_shapes[meta.name] = tuple(full)
            for r in range(dst_tp):
                plan.shapes[(sources[0], r)] = hf_shape(sources[0], args, role)
                # any TP rank holds it: take the one that shares rollout rank r's GPU when colocated
                plan.pieces.append(Piece(sources[0], r, 0, meta.name, meta.stage, r % src_tp, 0, full[0], 0))
            continue
        dim = 1 if rest in _ROW_PARALLEL else 0
        n = full[dim]
        local = _split(n, src_tp, f"{meta.name} dim {dim} at Megatron TP")
        plan.src_shapes[meta.name] = tuple(full[:dim] + [local] + full[dim + 1:])
        i = torch.arange(n)
        # Megatron: full index -> (TP rank, index in the local shard)
        if how == "cat":  # fc1: full [gate; up], shard s holds [gate_s; up_s]
            half, j = n // 2, i % (n // 2)
            per = _split(half, src_tp, f"{meta.name} gate/up at Megatron TP")
            src_tp_of = j // per
            src_pos = torch.where(i < half, j % per, per + j % per)
        else:
            src_tp_of, src_pos = i // local, i % local
        # HF: full index -> (which source tensor, index in it); -1: vocabulary padding
        if how == "qkv":
            d, qd = args.head_dim, args.q_per_group * args.head_dim
            per = qd + 2 * d
            g, o = i // per, i % per
            hf_id = torch.where(o < qd, 0, torch.where(o < qd + d, 1, 2))
            hf_pos = torch.where(hf_id == 0, g * qd + o, g * d + o - qd - torch.where(hf_id == 2, d, 0))
        elif how == "cat":
            hf_id, hf_pos = (i >= n // 2).long(), i % (n // 2)
        elif how == "vocab":
            hf_id, hf_pos = torch.where(i < args.vocab, 0, -1), i
        else:
            hf_id, hf_pos = torch.zeros_like(i), i
        for k, name in enumerate(sources):
            shape = list(hf_shape(name, args, role))
            kv = name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"))
            replicas = dst_tp // args.groups if kv and dst_tp > args.groups else 1
            if how == "vocab":
                rows = vocab_rows
            elif replicas > 1:
                rows = args.head_dim
            else:
                rows = _split(shape[dim], dst_tp, f"{name} dim {dim} at the rollout TP")
            dst_shape = shape[:dim] + [rows] + shape[dim + 1:]
            mine = hf_id == k
            for rep in range(replicas):
                if replicas > 1:  # KV head h lives on ranks h*replicas .. h*replicas + replicas-1
                    dst_rank, dst_pos = (hf_pos // rows) * replicas + rep, hf_pos % rows
                else:
                    dst_rank, dst_pos = hf_pos // rows, hf_pos % rows
                key = torch.where(mine, 0, -1)
                cols = [key, src_tp_of, dst_rank, src_pos, dst_pos]
                for a, b in _runs(cols):
                    r = int(dst_rank[a])
                    plan.shapes[(name, r)] = tuple(dst_shape)
                    plan.pieces.append(Piece(name, r, int(dst_pos[a]), meta.name, meta.stage, int(src_tp_of[a]),
                                             int(src_pos[a]), b - a, dim))
    return plan


def assemble(plan: ReshardPlan, shards: Mapping[tuple[str, int], Tensor], dst_rank: int,
             dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Rollout rank ``dst_rank``'s HF-named shards built from local Megatron shards
    ``{(global_name, tp_rank): tensor}`` (the pipeline stage is implied by the name). Shards a
    piece does not touch (vocabulary padding rows) are zero."""
    out: dict[str, Tensor] = {}
    for p in plan.pieces_for(dst_rank):
        src = shards[(p.src_name, p.src_tp)]
        if tuple(src.shape) != plan.src_shapes[p.src_name]:
            raise ReshardError(f"reshard: shard {p.src_name!r} of TP rank {p.src_tp} has shape {tuple(src.shape)}, "
                               f"the plan expects {plan.src_shapes[p.src_name]}")
        if p.hf_name not in out:
            out[p.hf_name] = torch.zeros(plan.shapes[(p.hf_name, dst_rank)], dtype=dtype or src.dtype,
                                         device=src.device)
        out[p.hf_name].narrow(p.dim, p.dst_start, p.length).copy_(src.narrow(p.dim, p.src_start, p.length))
    return out


def full_from_shards(per_rank: list[Mapping[str, Tensor]], hf_config: Any) -> dict[str, Tensor]:
    """Invert the rollout sharding: the full HF tensors from every rollout rank's shards, in rank
    order (rank 0's copy of a tensor every rank holds whole; one copy of each replicated KV head;
    vocabulary padding dropped). Does not check that replicas agree."""
    args = model_args_from_hf(hf_config)
    tp = len(per_rank)
    out: dict[str, Tensor] = {}
    for name in per_rank[0]:
        parts = [shards[name] for shards in per_rank]
        if tuple(parts[0].shape) == hf_shape(name, args):
            out[name] = parts[0]
            continue
        dim = 1 if re.sub(r"^model\.layers\.\d+\.", "", name) in _HF_ROW_PARALLEL else 0
        kv = name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"))
        if kv and tp > args.groups:
            parts = parts[:: tp // args.groups]
        full = torch.cat(parts, dim=dim)
        out[name] = full[: args.vocab] if name in ("model.embed_tokens.weight", "lm_head.weight") else full
    return out
