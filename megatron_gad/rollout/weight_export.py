"""Streaming, bucketed export of the actor's weights from TP x PP x DP shards into HF names.

Every rank calls :meth:`WeightExporter.buckets` and iterates it to the end. Parameters are visited
in one global order (pipeline stage 0's parameters first, each stage in ``named_parameters``
order); for each one:

1. the TP ranks of the owning pipeline stage all-gather its shards (``models.sharding``),
2. the full tensor is cast to the inference dtype and, at PP > 1, sent point to point from the
   owning stage to the destination ranks of its pipeline group (nobody else receives it),
3. destination ranks (``dst_ranks``, the ranks that feed an engine) convert it with
   ``models.hf_mapping.megatron_to_hf_tensors`` (QKV split per query group, fc1 -> gate/up, vocab
   padding removed, the tied output layer skipped) and append it to the current bucket; every
   other rank drops it at once.

Buckets of about ``bucket_bytes`` are yielded as lists of ``(hf_name, tensor)`` on destination
ranks only. At most one bucket plus the tensor in flight is alive on a destination rank (tracked
in :attr:`WeightExporter.stats`), and a sending stage keeps at most about one bucket of sends in
flight, never the whole model. Non-finite weights raise ModelDivergedError on every rank of the
model-parallel group once the export has run through. Model-parallel groups without a destination
rank (other DP replicas) do no communication at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_gad.models import sharding
from megatron_gad.rollout.base import DEFAULT_BUCKET_BYTES, ModelDivergedError, WeightBucket

#: ``convert(global_megatron_name, full_tensor, hf_config, role) -> [(hf_name, tensor), ...]``
Converter = Callable[[str, Tensor, Any, str], list[tuple[str, Tensor]]]


@dataclass(frozen=True)
class ParamMeta:
    """One parameter in the global export order: global Megatron name, full (TP=1) shape, owner stage."""

    name: str
    shape: tuple[int, ...]
    stage: int


@dataclass
class ExportStats:
    """Measurements of the last export on this rank."""

    peak_bytes: int = 0
    """Most bytes of exported tensors alive at once (bucket + tensor in flight)."""
    exported_bytes: int = 0
    """Bytes of HF tensors yielded (0 on non-destination ranks)."""
    num_tensors: int = 0
    """HF tensors yielded."""
    num_buckets: int = 0
    """Buckets yielded."""
    seconds: float = 0.0
    """Wall time from the first to the last parameter, including the consumer's time."""
    bucket_sizes: list[int] = field(default_factory=list)
    """Bytes of each yielded bucket."""


def _default_converter(name: str, full: Tensor, hf_config: Any, role: str) -> list[tuple[str, Tensor]]:
    from megatron_gad.models.hf_mapping import megatron_to_hf_tensors

    return megatron_to_hf_tensors(name, full, hf_config, role=role)


def _owned(t: Tensor) -> Tensor:
    """``t`` as a contiguous tensor that owns its storage (so the full tensor it views can be freed)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class WeightExporter:
    """Streams the HF-named full weights of a Megatron model (one chunk per rank) in buckets.

    ``chunks``: this rank's model chunks (``build_model`` output; one chunk, no virtual pipeline).
    ``dtype``: inference dtype of the exported tensors. ``dst_ranks``: global ranks that receive
    buckets. ``convert``: the Megatron -> HF converter (default ``megatron_to_hf_tensors``).
    Construct and iterate on every rank.
    """

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        hf_config: Any,
        *,
        dtype: torch.dtype = torch.bfloat16,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        dst_ranks: Iterable[int] = (0,),
        role: str = "actor",
        convert: Converter | None = None,
    ) -> None:
        if len(chunks) != 1:
            raise ValueError(f"WeightExporter takes one model chunk per rank, got {len(chunks)}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.chunk = chunks[0]
        self.hf_config = hf_config
        self.dtype = dtype
        self.bucket_bytes = int(bucket_bytes)
        self.dst_ranks = frozenset(int(r) for r in dst_ranks)
        self.role = role
        self.convert = convert or _default_converter
        self.stats = ExportStats()
        self._metas: list[ParamMeta] | None = None
        self._tied = bool(getattr(hf_config, "tie_word_embeddings", False))

    # ---------------------------------------------------------------- metadata (collective, cached)
    def _skip(self, local_name: str) -> bool:
        """The tied output layer is a copy of the embedding: never exported."""
        return self._tied and local_name == "output_layer.weight"

    def _local_metas(self, stage: int, tp: int) -> list[ParamMeta]:
        model = sharding.unwrap(self.chunk)
        offset = sharding.layer_offset(model)
        metas = []
        for name, param in model.named_parameters():
            if self._skip(name):
                continue
            shape = list(param.shape)
            if sharding.is_tp_sharded(param) and tp > 1:
                shape[int(param.partition_dim)] *= tp
            metas.append(ParamMeta(sharding.global_name(name, offset), tuple(shape), stage))
        return metas

    def metadata(self) -> list[ParamMeta]:
        """The global export order, gathered once over the pipeline group and cached.

        Collective over the pipeline group (all its ranks must call it); every rank gets the
        same list.
        """
        if self._metas is None:
            from megatron.core import parallel_state as ps

            stage, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
            local = self._local_metas(stage, ps.get_tensor_model_parallel_world_size())
            per_stage: list[Any] = [None] * pp
            if pp > 1:
                dist.all_gather_object(per_stage, local, group=ps.get_pipeline_model_parallel_group())
            else:
                per_stage = [local]
            self._metas = [m for stage_metas in per_stage for m in stage_metas]
            names = [m.name for m in self._metas]
            if len(set(names)) != len(names):
                raise RuntimeError("WeightExporter: two pipeline stages export the same parameter name")
        return self._metas

    # ---------------------------------------------------------------- export
    def _group_is_active(self) -> bool:
        """True when this rank's model-parallel group (TP x PP) contains a destination rank."""
        from megatron.core import parallel_state as ps

        if dist.get_world_size() == 1:
            return 0 in self.dst_ranks
        ranks = dist.get_process_group_ranks(ps.get_model_parallel_group())
        return any(r in self.dst_ranks for r in ranks)

    def buckets(self) -> Iterator[WeightBucket]:
        """Yield buckets of ``(hf_name, tensor)`` on destination ranks; nothing elsewhere.

        Every rank must iterate to exhaustion (the loop contains collectives over the TP and PP
        groups). The consumer should drop each bucket once loaded: the exporter only frees its
        own reference. Where no gather, cast or split is needed (TP=1, same dtype) a tensor may
        share storage with the live parameter: copy it if you keep it past the next optimizer
        step. Updates :attr:`stats` (``peak_bytes`` counts such views too: an upper bound).
        """
        self.stats = ExportStats()
        if not self._group_is_active():
            return
        start = time.perf_counter()
        keep = dist.get_rank() in self.dst_ranks
        bucket: WeightBucket = []
        size = 0
        metas = self.metadata()
        # index of the first non-finite tensor held here (len(metas): none), kept on the device
        first_bad = torch.full((), len(metas), dtype=torch.int64, device=_device())
        for index, (meta, full) in enumerate(self._full_tensors()):
            if full is None:
                continue
            torch.minimum(first_bad, torch.where(torch.isfinite(full).all(), len(metas), index), out=first_bad)
            if not keep:
                continue
            hf = [(n, _owned(t)) for n, t in self.convert(meta.name, full, self.hf_config, self.role)]
            out_bytes = sum(_nbytes(t) for _, t in hf)
            self._note_alive(size + _nbytes(full) + out_bytes)
            del full
            if bucket and size + out_bytes > self.bucket_bytes:
                yield self._emit(bucket, size)
                bucket, size = [], 0
            bucket.extend(hf)
            size += out_bytes
            del hf
        if bucket:
            yield self._emit(bucket, size)
        self.stats.seconds = time.perf_counter() - start
        self._check_finite(first_bad, metas)

    @staticmethod
    def _check_finite(first_bad: Tensor, metas: list[ParamMeta]) -> None:
        """Raise ModelDivergedError on every rank of the model-parallel group when any of its
        ranks held a non-finite weight (one all-reduce and one host sync per export), so that no
        rank is left waiting in a collective for a peer that stopped."""
        from megatron.core import parallel_state as ps

        found = first_bad.clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MIN, group=ps.get_model_parallel_group())
        index = int(found)
        if index < len(metas):
            raise ModelDivergedError(f"exported weights hold inf/NaN (first: {metas[index].name}): the model has "
                                     "diverged (learning rate too high?)")

    def _emit(self, bucket: WeightBucket, size: int) -> WeightBucket:
        self.stats.num_buckets += 1
        self.stats.num_tensors += len(bucket)
        self.stats.exported_bytes += size
        self.stats.bucket_sizes.append(size)
        return bucket

    def _note_alive(self, nbytes: int) -> None:
        self.stats.peak_bytes = max(self.stats.peak_bytes, nbytes)

    def _full_tensors(self) -> Iterator[tuple[ParamMeta, Tensor | None]]:
        """Per parameter in global order: its full tensor in ``dtype`` where this rank needs it.

        Collective: TP all-gather on the owning stage, then, at PP > 1, a point-to-point send
        from the owning stage's rank to each destination rank of this pipeline group (no other
        rank receives anything). Yields None on ranks that do not need the tensor.
        """
        from megatron.core import parallel_state as ps

        from megatron_gad.runtime.distributed import device

        metas = self.metadata()
        me, stage = dist.get_rank(), ps.get_pipeline_model_parallel_rank()
        pp = ps.get_pipeline_model_parallel_world_size()
        pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else [me]
        dsts = [r for r in pp_ranks if r in self.dst_ranks]
        local = sharding.full_tensors(self.chunk, skip=self._skip)
        dev = device()
        sends: list[tuple[Any, Tensor]] = []  # in flight: (work, tensor kept alive until done)
        in_flight = 0
        for meta in metas:
            full: Tensor | None = None
            owner = pp_ranks[meta.stage]
            if meta.stage == stage:
                name, gathered = next(local)
                if name != meta.name:
                    raise RuntimeError(f"WeightExporter: stage {stage} yielded {name!r}, expected {meta.name!r}")
                full = gathered.to(self.dtype).contiguous()
                self._note_alive(_nbytes(full))
                for dst in dsts:
                    if dst != me:
                        sends.append((dist.isend(full, dst=dst), full))
                        in_flight += _nbytes(full)
                if in_flight >= self.bucket_bytes:  # bound what a sender runs ahead of its receivers
                    _wait_all(sends)
                    in_flight = 0
            elif me in dsts:
                full = torch.empty(meta.shape, dtype=self.dtype, device=dev)
                dist.recv(full, src=owner)
            yield meta, full
        _wait_all(sends)


def _device() -> torch.device:
    from megatron_gad.runtime.distributed import device

    return device()


def _wait_all(sends: list[tuple[Any, Tensor]]) -> None:
    """Complete the sends in flight (on a GPU the host also waits for the stream, so the tensors
    they read can be freed) and forget them."""
    for work, _ in sends:
        work.wait()
    if sends and torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()
    sends.clear()


def sync_weights(exporter: WeightExporter, engine: Any | None) -> ExportStats:
    """Stream the exporter's buckets into ``engine.load_weights`` (destination ranks) or drain them.

    Call on every rank; ``engine`` is None on ranks without one. Returns this rank's stats.
    """
    if engine is not None:
        engine.load_weights(exporter.buckets())
    else:
        for _ in exporter.buckets():
            pass
    return exporter.stats
