"""Streaming, bucketed export of the actor's weights from TP x PP x DP shards into HF names.

Every rank calls :meth:`WeightExporter.buckets` and iterates it to the end. Parameters are visited
in one global order (pipeline stage 0's parameters first, each stage in ``named_parameters``
order); for each one:

1. every rank holding it checks its shard is finite (``aminmax``: one pass, no temporary) and
   casts it to the inference dtype;
2. its HF tensors are assembled on the destination ranks (``dst_ranks``, the ranks that feed an
   engine) and nowhere else, by one of two transports (``transport``):

   - ``direct`` (what ``auto`` picks on gloo, i.e. CPU ranks;
     :mod:`megatron_gad.rollout.direct_transport`): each TP rank of the owning stage hands the
     blocks of its shard that the HF tensors are made of (q/k/v rows per query group, gate and
     up rows, the real vocabulary rows, a row-parallel shard's columns) straight to each
     destination rank, which puts each block in its place in the HF tensor; a destination
     copies its own blocks in. Nothing is relayed, all-gathered, concatenated or split
     afterwards. Under ``auto``, when the model-parallel group has one destination rank and
     lives on one host, blocks travel through shared memory: written by each sender straight
     into the destination's tensors when the consumer keeps them (``buckets(into=...)``: the
     exporter's arena, which the CPU engine keeps as its weights), otherwise through two
     slots per sender (:mod:`megatron_gad.rollout.shm_link`), gloo carrying only counters;
     with ``direct``, or several destinations, as gloo messages received in place. The critic
     and a custom ``convert`` take the older form: whole shards into a full Megatron tensor,
     then ``convert``;
   - ``gather`` (what ``auto`` picks on NCCL): the TP ranks of the owning stage all-gather the
     shards (``models.sharding``), at PP > 1 the owning stage sends the full tensor point to
     point to the destination ranks of its pipeline group, and they convert it with
     ``models.hf_mapping.megatron_to_hf_tensors`` (the QKV split makes new tensors; fc1's
     halves, the vocabulary rows without padding and every other tensor are views);

3. destination ranks append the HF tensors to the current bucket (the tied output layer is
   skipped); every other rank drops what it holds at once.

Buckets of about ``bucket_bytes`` are yielded as lists of ``(hf_name, tensor)`` on destination
ranks only. At most one bucket plus the tensor in flight is alive on a destination rank (tracked
in :attr:`WeightExporter.stats`; tensors of ``into`` or of the arena are the consumer's own and
allocate nothing), and a sending rank keeps at most about one bucket of gloo sends (or two
shared-memory slots of at most 32 MiB) in flight, never the whole model. Non-finite weights
raise ModelDivergedError on every rank of the model-parallel group once the export has run
through. Model-parallel groups without a destination rank (other DP replicas) do no
communication at all.

Where no gather, cast or split is needed (a whole parameter of the destination's own stage in
the export dtype, not the fused QKV) a yielded tensor is a view of the live parameter: nothing
is copied, and the CPU engine keeps it as its weight (see ``CPURolloutEngine.load_weights`` for
why that is exactly a copy made at the sync).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_gad.models import sharding
from megatron_gad.rollout.base import DEFAULT_BUCKET_BYTES, ModelDivergedError, WeightBucket
from megatron_gad.rollout.direct_transport import DirectTransport, _device, _wait_all
from megatron_gad.rollout.shm_link import ShmLink
from megatron_gad.rollout.shm_link import nbytes as _nbytes

TRANSPORTS = ("auto", "direct", "gather")

#: ``convert(global_megatron_name, full_tensor, hf_config, role) -> [(hf_name, tensor), ...]``
Converter = Callable[[str, Tensor, Any, str], list[tuple[str, Tensor]]]


@dataclass(frozen=True)
class ParamMeta:
    """One parameter in the global export order: global Megatron name, full (TP=1) shape, owner stage."""

    name: str
    shape: tuple[int, ...]
    stage: int
    split_dim: int | None = None
    """The dimension Megatron splits the parameter along over TP ranks (None: replicated)."""


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


def _finite(t: Tensor) -> Tensor:
    """A 0-dim bool tensor, True when every element of ``t`` is finite: its minimum and maximum
    are (both propagate NaN), one pass without a temporary, several times cheaper than
    ``isfinite(t).all()``. Stays on ``t``'s device."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isfinite(low) & torch.isfinite(high)


class WeightExporter(DirectTransport):
    """Streams the HF-named full weights of a Megatron model (one chunk per rank) in buckets.

    ``chunks``: this rank's model chunks (``build_model`` output; one chunk, no virtual pipeline).
    ``dtype``: inference dtype of the exported tensors. ``dst_ranks``: global ranks that receive
    buckets. ``convert``: the Megatron -> HF converter (default ``megatron_to_hf_tensors``).
    ``transport``: ``"auto"`` (on gloo: direct, through shared memory where the group allows;
    on NCCL: gather), ``"direct"`` (gloo messages, no shared memory) or ``"gather"``; see the
    module docstring. Construct and iterate on every rank.
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
        transport: str = "auto",
    ) -> None:
        if len(chunks) != 1:
            raise ValueError(f"WeightExporter takes one model chunk per rank, got {len(chunks)}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.chunk = chunks[0]
        self.hf_config = hf_config
        self.dtype = dtype
        self.bucket_bytes = int(bucket_bytes)
        self.dst_ranks = frozenset(int(r) for r in dst_ranks)
        self.role = role
        self.convert = convert or self._megatron_to_hf
        self.transport = transport
        self.stats = ExportStats()
        self._metas: list[ParamMeta] | None = None
        self._grid: dict[tuple[int, int], int] | None = None
        self._links: dict[int, ShmLink] | None = None
        self._tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self._first_bad: Tensor | None = None
        self._custom_convert = convert is not None
        self._args: Any = None
        self._table: dict[str, dict[int, list[Any]]] | None = None
        self._arena: dict[str, Tensor] | None = None  # {}: tried, not possible here
        self._arena_seen: dict[int, int] = {}
        self._arena_need: dict[int, int] = {}

    # ---------------------------------------------------------------- metadata (collective, cached)
    def _skip(self, local_name: str) -> bool:
        """The tied output layer is a copy of the embedding: never exported."""
        return self._tied and local_name == "output_layer.weight"

    def _local_metas(self, stage: int, tp: int) -> list[ParamMeta]:
        metas = []
        for name, param in self._local_params():
            shape = list(param.shape)
            split = int(param.partition_dim) if sharding.is_tp_sharded(param) and tp > 1 else None
            if split is not None:
                shape[split] *= tp
            metas.append(ParamMeta(name, tuple(shape), stage, split))
        return metas

    def _local_params(self) -> Iterator[tuple[str, Tensor]]:
        """This stage's exported parameters in order, under their global names."""
        model = sharding.unwrap(self.chunk)
        offset = sharding.layer_offset(model)
        for name, param in model.named_parameters():
            if not self._skip(name):
                yield sharding.global_name(name, offset), param

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

    def _rank_grid(self) -> dict[tuple[int, int], int]:
        """``(stage, tp_rank) -> global rank`` within this model-parallel group (collective over
        it the first time, then cached)."""
        if self._grid is None:
            from megatron.core import parallel_state as ps

            me = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), dist.get_rank())
            if dist.get_world_size() == 1:
                entries = [me]
            else:
                group = ps.get_model_parallel_group()
                entries = [None] * dist.get_world_size(group)
                dist.all_gather_object(entries, me, group=group)
            self._grid = {(s, t): r for s, t, r in entries}
        return self._grid

    # ---------------------------------------------------------------- export
    def _group_is_active(self) -> bool:
        """True when this rank's model-parallel group (TP x PP) contains a destination rank."""
        from megatron.core import parallel_state as ps

        if dist.get_world_size() == 1:
            return 0 in self.dst_ranks
        ranks = dist.get_process_group_ranks(ps.get_model_parallel_group())
        return any(r in self.dst_ranks for r in ranks)

    def _direct(self) -> bool:
        if self.transport == "auto":
            return dist.get_world_size() == 1 or dist.get_backend() == "gloo"
        return self.transport == "direct"

    def buckets(self, into: Mapping[str, Tensor] | None = None) -> Iterator[WeightBucket]:
        """Yield buckets of ``(hf_name, tensor)`` on destination ranks; nothing elsewhere.

        Every rank must iterate to exhaustion (the loop contains collectives over the TP and PP
        groups). The consumer should drop each bucket once loaded: the exporter only frees its
        own reference. Where no gather, cast or split is needed (TP=1, same dtype) a tensor is
        a view of the live parameter: copy it if you keep it past the next optimizer step, or
        keep it knowingly as a live view (the CPU engine does). Updates :attr:`stats`
        (``peak_bytes`` counts such views, and tensors of ``into``, too: an upper bound).

        ``into`` (destination ranks; ignored elsewhere and by the ``gather`` transport): HF name
        -> a tensor the consumer owns and keeps as its weight (an engine's parameter). Under the
        ``direct`` transport with the default converter for the actor (the critic and a custom
        ``convert`` assemble new full tensors), every HF tensor that must be assembled (a TP-sharded or remote
        parameter, a cast, the q/k/v split) is then written in place, with nothing allocated
        per export: on CPU ranks of one host with one destination, into the exporter's
        shared-memory arena (made on the first such export, kept by the exporter and mapped by
        every rank of the group, so senders write their blocks straight in; the bucket carries
        the arena's tensor and the consumer takes it as its storage, after which later exports
        rewrite the consumer's weights where they are); otherwise into ``into[name]`` where it
        fits (see :meth:`_destination`), the bucket carrying that very tensor. The writes happen
        as the export runs, before the finite check at its end: a consumer handed ``into`` must
        treat its tensors as undefined until the iteration has completed (see
        ``CPURolloutEngine.load_weights``). A consumer that did not pass ``into`` gets new
        tensors (or views of live parameters), never the arena's.
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
        self._first_bad = torch.full((), len(metas), dtype=torch.int64, device=_device())
        if not self._direct():
            converted = self._converted(self._gathered_full_tensors())
        elif self._piece_table() is None:
            converted = self._converted(self._direct_full_tensors())
        else:
            converted = ((meta, hf, 0) for meta, hf in self._direct_hf_tensors(into if keep else None))
        for meta, hf, full_bytes in converted:
            if hf is None or not keep:
                continue
            hf = [(n, t.contiguous()) for n, t in hf]
            out_bytes = sum(_nbytes(t) for _, t in hf)
            self._note_alive(size + full_bytes + out_bytes)
            if bucket and size + out_bytes > self.bucket_bytes:
                self._arena_settle()
                yield self._emit(bucket, size)
                bucket, size = [], 0
            bucket.extend(hf)
            size += out_bytes
            del hf
        if bucket:
            self._arena_settle()
            yield self._emit(bucket, size)
        self.stats.seconds = time.perf_counter() - start
        self._check_finite(self._first_bad, metas)

    def _converted(self, full_tensors: Iterator[tuple[ParamMeta, Tensor | None]]
                   ) -> Iterator[tuple[ParamMeta, list[tuple[str, Tensor]] | None, int]]:
        """``(meta, HF tensors, bytes of the full tensor in flight)`` of a full-tensor transport:
        each full tensor through ``convert`` (None stays None)."""
        for meta, full in full_tensors:
            if full is None:
                yield meta, None, 0
                continue
            yield meta, self.convert(meta.name, full, self.hf_config, self.role), _nbytes(full)
            del full

    def _note_finite(self, index: int, t: Tensor) -> None:
        """Record parameter ``index`` as the first non-finite one when ``t`` is not finite (no
        host sync: the flag stays on the device until the end of the export)."""
        torch.minimum(self._first_bad, torch.where(_finite(t), self._first_bad, index), out=self._first_bad)

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

    def _megatron_to_hf(self, name: str, full: Tensor, hf_config: Any, role: str) -> list[tuple[str, Tensor]]:
        """The default converter: ``megatron_to_hf_tensors`` with the model's ``ModelArgs``
        derived once per exporter, not once per tensor."""
        from megatron_gad.models.hf_mapping import megatron_to_hf_tensors

        return megatron_to_hf_tensors(name, full, hf_config, role, self._model_args())

    def _model_args(self) -> Any:
        if self._args is None:
            from megatron_gad.models.transformer import model_args_from_hf

            self._args = model_args_from_hf(self.hf_config)
        return self._args

    def _gathered_full_tensors(self) -> Iterator[tuple[ParamMeta, Tensor | None]]:
        """Per parameter in global order: its full tensor in ``dtype`` where this rank needs it
        (the ``gather`` transport).

        Collective: TP all-gather on the owning stage, then, at PP > 1, a point-to-point send
        from the owning stage's rank to each destination rank of this pipeline group (no other
        rank receives anything). Yields None on ranks that do not need the tensor.
        """
        from megatron.core import parallel_state as ps

        metas = self.metadata()
        me, stage = dist.get_rank(), ps.get_pipeline_model_parallel_rank()
        pp = ps.get_pipeline_model_parallel_world_size()
        pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else [me]
        dsts = [r for r in pp_ranks if r in self.dst_ranks]
        local = sharding.full_tensors(self.chunk, skip=self._skip)
        dev = _device()
        sends: list[tuple[Any, Tensor]] = []  # in flight: (work, tensor kept alive until done)
        in_flight = 0
        for index, meta in enumerate(metas):
            full: Tensor | None = None
            owner = pp_ranks[meta.stage]
            if meta.stage == stage:
                full = self._checked_shard(index, meta, local, stage)
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


def sync_weights(exporter: WeightExporter, engine: Any | None) -> ExportStats:
    """Stream the exporter's buckets into ``engine.load_weights`` (destination ranks) or drain them.

    Call on every rank; ``engine`` is None on ranks without one. Returns this rank's stats.
    """
    if engine is not None:
        # an engine that owns its weights' storage (the CPU engine) has them written in place;
        # others (vLLM) receive new full tensors
        engine.load_weights(exporter.buckets(into=engine.weight_destinations()))
    else:
        for _ in exporter.buckets():
            pass
    return exporter.stats
