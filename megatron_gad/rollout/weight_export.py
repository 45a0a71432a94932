"""Streaming, bucketed export of the actor's weights from TP x PP x DP shards into HF names.

Every rank calls :meth:`WeightExporter.buckets` and iterates it to the end. Parameters are visited
in one global order (pipeline stage 0's parameters first, each stage in ``named_parameters``
order); for each one:

1. every rank holding it checks its shard is finite (``aminmax``: one pass, no temporary) and
   casts it to the inference dtype;
2. the full tensor is assembled on the destination ranks (``dst_ranks``, the ranks that feed an
   engine) and nowhere else, by one of two transports (``transport``):

   - ``direct`` (what ``auto`` picks on gloo, i.e. CPU ranks): each TP rank of the owning stage
     hands its shard straight to each destination rank, which puts it into its rows of a
     preallocated full tensor (``linear_fc1``'s gate and up halves each into their own rows, a
     row-parallel shard into its columns); a destination copies its own shard in. Nothing is
     relayed, all-gathered or concatenated. Under ``auto``, when the model-parallel group has
     one destination rank and lives on one host, shards travel through shared memory
     (:mod:`megatron_gad.rollout.shm_link`: copied into a segment by the sender, out of it by
     the destination, gloo carrying only counters); otherwise, and with ``direct``, as gloo
     messages received in place;
   - ``gather`` (what ``auto`` picks on NCCL): the TP ranks of the owning stage all-gather the
     shards (``models.sharding``), and at PP > 1 the owning stage sends the full tensor point
     to point to the destination ranks of its pipeline group;

3. destination ranks convert it with ``models.hf_mapping.megatron_to_hf_tensors`` (the QKV split
   per query group makes new tensors; fc1's gate/up halves, the vocabulary rows without padding
   and every other tensor are views, not copies; the tied output layer is skipped) and append
   it to the current bucket; every other rank drops it at once.

Buckets of about ``bucket_bytes`` are yielded as lists of ``(hf_name, tensor)`` on destination
ranks only. At most one bucket plus the tensor in flight is alive on a destination rank (tracked
in :attr:`WeightExporter.stats`), and a sending rank keeps at most about one bucket of gloo sends
(or two shared-memory slots of at most 32 MiB) in flight, never the whole model. Non-finite
weights raise ModelDivergedError on every rank of the model-parallel group once the export has
run through. Model-parallel groups without a destination rank (other DP replicas) do no
communication at all.

Where no gather, cast or split is needed (TP=1 in the parameter's dtype) a yielded tensor is a
view of the live parameter: nothing is copied, and the CPU engine keeps it as its weight (see
``CPURolloutEngine.load_weights`` for why that is exactly a copy made at the sync).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_gad.models import sharding
from megatron_gad.rollout.base import DEFAULT_BUCKET_BYTES, ModelDivergedError, WeightBucket
from megatron_gad.rollout.shm_link import SHM_SLOT_BYTES, ShmLink, connect_links
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


class WeightExporter:
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

    def _shm_links(self) -> dict[int, ShmLink] | None:
        """This rank's shared-memory links (peer rank -> link) for the ``auto`` transport on CPU
        ranks, set up on the first export and kept: each rank makes one segment toward the
        destination rank, the destination maps it, and the file is unlinked at once (the mappings
        outlive it; nothing stays in ``/dev/shm``). None (the gloo sends are used) under
        ``direct``, when the model-parallel group has several destination ranks (one that also
        sends could then wait on a peer that waits on it), spans several hosts, or ``/dev/shm``
        is not usable (:func:`~megatron_gad.rollout.shm_link.connect_links`). Collective over
        the model-parallel group."""
        if self._links is not None:
            return self._links or None
        self._links = {}
        if self.transport != "auto" or dist.get_world_size() == 1:
            return None
        from megatron.core import parallel_state as ps

        group = ps.get_model_parallel_group()
        ranks = sorted(self._rank_grid().values())
        dsts = [r for r in ranks if r in self.dst_ranks]
        if len(dsts) != 1:
            return None
        me = dist.get_rank()
        metas = self.metadata()
        item = torch.empty((), dtype=self.dtype).element_size()
        longest_row = max((item * math.prod(m.shape[1:]) for m in metas), default=1)
        slot = max(min(self.bucket_bytes, SHM_SLOT_BYTES), longest_row)
        slot = -(-slot // ShmLink.ALIGN) * ShmLink.ALIGN
        self._links = connect_links(me, ranks, dsts, slot, group) or {}
        return self._links or None

    def buckets(self, into: Mapping[str, Tensor] | None = None) -> Iterator[WeightBucket]:
        """Yield buckets of ``(hf_name, tensor)`` on destination ranks; nothing elsewhere.

        Every rank must iterate to exhaustion (the loop contains collectives over the TP and PP
        groups). The consumer should drop each bucket once loaded: the exporter only frees its
        own reference. Where no gather, cast or split is needed (TP=1, same dtype) a tensor is
        a view of the live parameter: copy it if you keep it past the next optimizer step, or
        keep it knowingly as a live view (the CPU engine does). Updates :attr:`stats`
        (``peak_bytes`` counts such views, and tensors of ``into``, too: an upper bound).

        ``into`` (destination ranks; ignored elsewhere and by the ``gather`` transport): HF name
        -> a tensor the consumer owns (an engine's parameter storage). Under the ``direct``
        transport every HF tensor that must be assembled (a TP-sharded or remote parameter, a
        cast, the q/k/v split) is written straight into ``into[name]`` when that fits (see
        :meth:`_destination`), and the bucket then carries that very tensor: nothing is
        allocated for it. The writes happen as the export runs, before the finite check at its
        end: a consumer handed ``into`` must treat its tensors as undefined until the iteration
        has completed (see ``CPURolloutEngine.load_weights``).
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
                yield self._emit(bucket, size)
                bucket, size = [], 0
            bucket.extend(hf)
            size += out_bytes
            del hf
        if bucket:
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

    def _direct_full_tensors(self) -> Iterator[tuple[ParamMeta, Tensor | None]]:
        """Per parameter in global order: its full Megatron tensor in ``dtype`` on destination
        ranks of this model-parallel group, None elsewhere (the ``direct`` transport without a
        piece table: a custom ``convert``, or the critic).

        Like :meth:`_direct_hf_tensors`, but each TP rank hands its whole shard (fc1's as its
        gate and up halves) into its rows (a row-parallel shard: its columns) of a preallocated
        full tensor, which the converter then splits.
        """
        from megatron.core import parallel_state as ps

        metas, grid = self.metadata(), self._rank_grid()
        me = dist.get_rank()
        stage, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        tp = ps.get_tensor_model_parallel_world_size()
        dsts = sorted(r for r in grid.values() if r in self.dst_ranks)
        links = self._shm_links() if _device().type == "cpu" else None  # the links carry host tensors
        local = self._local_params()
        dev = _device()
        sends: list[tuple[Any, Tensor]] = []
        in_flight = 0
        for index, meta in enumerate(metas):
            shard = self._checked_shard(index, meta, local, stage)
            stage_ranks = [grid[(meta.stage, t)] for t in range(tp)]
            holders = stage_ranks if meta.split_dim is not None else None
            full: Tensor | None = None
            if shard is not None:  # send what destinations elsewhere need from this rank
                for dst in dsts:
                    if dst == me:
                        continue
                    if holders is None and (dst in stage_ranks or tp_rank != 0):
                        continue
                    for piece in _pieces(meta, shard):
                        if links is not None:
                            links[dst].put(piece)
                            continue
                        sends.append((dist.isend(piece, dst=dst), piece))
                        in_flight += _nbytes(piece)
            if me in dsts:
                if holders is None:
                    full = shard if shard is not None else torch.empty(meta.shape, dtype=self.dtype, device=dev)
                    if shard is None and links is not None:
                        links[grid[(meta.stage, 0)]].get(full)
                    elif shard is None:
                        dist.recv(full, src=grid[(meta.stage, 0)])
                else:
                    full = torch.empty(meta.shape, dtype=self.dtype, device=dev)
                    for t, src in enumerate(holders):
                        for piece, target in zip(_pieces(meta, shard if src == me else None),
                                                 _targets(meta, full, tp, t)):
                            if src == me:
                                target.copy_(piece)
                            elif links is not None:
                                links[src].get(target)
                            elif target.is_contiguous():
                                dist.recv(target, src=src)
                            else:
                                buf = torch.empty(target.shape, dtype=self.dtype, device=dev)
                                dist.recv(buf, src=src)
                                target.copy_(buf)
                                del buf
            del shard
            if in_flight >= self.bucket_bytes:  # bound what a sender runs ahead of its receivers
                _wait_all(sends)
                in_flight = 0
            yield meta, full
        _wait_all(sends)
        for link in (links or {}).values():
            link.close()

    def _piece_table(self) -> dict[str, dict[int, list[Any]]] | None:
        """Per global Megatron name, per source TP rank, the blocks of that rank's shard and where
        each lands in which HF tensor (:func:`megatron_gad.rollout.reshard.plan_resharding` into
        one engine at TP=1), or None where the exporter assembles Megatron full tensors and
        converts them instead (a custom ``convert``, the critic, a parameter whose sharding the
        plan does not describe). The same on every rank (pure arithmetic on the metadata);
        computed once."""
        if self._table is None:
            self._table = {}
            if self._custom_convert or self.role != "actor":
                return None
            from megatron.core import parallel_state as ps

            from megatron_gad.models.hf_mapping import MappingError
            from megatron_gad.rollout.reshard import ReshardError, plan_resharding

            tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
            metas = self.metadata()
            try:
                plan = plan_resharding(metas, self.hf_config, tp, pp, 1, self.role, args=self._model_args())
            except (ReshardError, MappingError):
                return None
            for meta in metas:
                local = list(meta.shape)
                if meta.split_dim is not None:
                    local[meta.split_dim] //= tp
                if plan.src_shapes.get(meta.name) != tuple(local):
                    self._table = {}
                    return None
                self._table[meta.name] = {}
            for piece in plan.pieces:
                self._table[piece.src_name].setdefault(piece.src_tp, []).append(piece)
        return self._table or None

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

    def _destination(self, name: str, into: Mapping[str, Tensor] | None, own: set[int]) -> Tensor:
        """Where HF tensor ``name`` is assembled: ``into[name]`` when it has the tensor's shape,
        the export dtype and device, is contiguous and shares no storage with this rank's
        parameters; else a new tensor."""
        from megatron_gad.models.hf_mapping import hf_shape

        shape = hf_shape(name, self._model_args(), self.role)
        dev = _device()
        given = into.get(name) if into is not None else None
        if (given is not None and tuple(given.shape) == shape and given.dtype == self.dtype and given.device == dev
                and given.is_contiguous() and given.untyped_storage().data_ptr() not in own):
            return given
        return torch.empty(shape, dtype=self.dtype, device=dev)

    def _direct_hf_tensors(
        self, into: Mapping[str, Tensor] | None
    ) -> Iterator[tuple[ParamMeta, list[tuple[str, Tensor]] | None]]:
        """Per parameter in global order: its HF tensors in ``dtype`` on destination ranks of this
        model-parallel group, None elsewhere (the ``direct`` transport, with a piece table).

        Every holder of a shard checks and casts it, then hands each block of it that an HF
        tensor needs (:meth:`_piece_table`: q/k/v rows per query group, fc1's gate and up rows,
        the real vocabulary rows, a row-parallel shard's columns) to each destination rank that
        does not hold it, through a shared-memory link or as a gloo message. A destination puts
        each block straight into its place in the HF tensor: in ``into[name]`` (the engine's own
        storage, see :meth:`_destination`) or, failing that, a new tensor; its own blocks it
        copies in. A parameter held whole here that needs no split is yielded as views of the
        local shard instead (at TP=1 in the parameter's dtype: of the live parameter). A
        replicated parameter comes from the destination's own copy when it is on the owning
        stage, else from that stage's TP rank 0. Gloo sends are bounded to about one bucket in
        flight per rank; receives are in the global order, so no rank waits on a peer that
        waits on it.
        """
        from megatron.core import parallel_state as ps

        from megatron_gad.models.hf_mapping import hf_sources, megatron_to_hf_tensors

        metas, grid, table = self.metadata(), self._rank_grid(), self._piece_table()
        args = self._model_args()
        me = dist.get_rank()
        stage, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        tp = ps.get_tensor_model_parallel_world_size()
        dsts = sorted(r for r in grid.values() if r in self.dst_ranks)
        links = self._shm_links() if _device().type == "cpu" else None  # the links carry host tensors
        local = self._local_params()
        own = {p.untyped_storage().data_ptr() for _, p in self._local_params()} if into is not None else set()
        sends: list[tuple[Any, Tensor]] = []
        in_flight = 0
        for index, meta in enumerate(metas):
            shard = self._checked_shard(index, meta, local, stage)
            sharded = meta.split_dim is not None
            stage_ranks = [grid[(meta.stage, t)] for t in range(tp)]
            blocks = table[meta.name]
            if shard is not None:  # send what destinations elsewhere need from this rank
                for dst in dsts:
                    if dst == me or (not sharded and (dst in stage_ranks or tp_rank != 0)):
                        continue
                    for p in blocks.get(tp_rank if sharded else 0, []):
                        block = shard.narrow(p.dim, p.src_start, p.length)
                        if links is not None:
                            links[dst].put(block)
                            continue
                        block = block.contiguous()
                        sends.append((dist.isend(block, dst=dst), block))
                        in_flight += _nbytes(block)
            hf: list[tuple[str, Tensor]] | None = None
            if me in dsts:
                sources, how = hf_sources(meta.name, self.hf_config, self.role, args)
                if shard is not None and (not sharded or tp == 1) and how != "qkv":
                    hf = megatron_to_hf_tensors(meta.name, shard, self.hf_config, self.role, args)
                else:
                    hf = [(n, self._destination(n, into, own)) for n in sources]
                    self._receive(dict(hf), blocks, shard, [(t, stage_ranks[t]) for t in range(tp)] if sharded
                                  else [(0, me if shard is not None else stage_ranks[0])], links)
            del shard
            if in_flight >= self.bucket_bytes:  # bound what a sender runs ahead of its receivers
                _wait_all(sends)
                in_flight = 0
            yield meta, hf
        _wait_all(sends)
        for link in (links or {}).values():
            link.close()

    def _checked_shard(self, index: int, meta: ParamMeta, local: Iterator[tuple[str, Tensor]],
                       stage: int) -> Tensor | None:
        """This rank's shard of parameter ``index`` in the export dtype (recorded in the finite
        check first), or None when another stage owns it."""
        if meta.stage != stage:
            return None
        name, param = next(local)
        if name != meta.name:
            raise RuntimeError(f"WeightExporter: stage {stage} yielded {name!r}, expected {meta.name!r}")
        shard = param.detach()
        self._note_finite(index, shard)
        shard = shard.to(self.dtype).contiguous()
        self._note_alive(_nbytes(shard))
        return shard

    def _receive(self, dest: dict[str, Tensor], blocks: dict[int, list[Any]], shard: Tensor | None,
                 sources: list[tuple[int, int]], links: dict[int, ShmLink] | None) -> None:
        """Fill the HF tensors ``dest`` from the blocks of each ``(tp_rank, global_rank)`` source
        in ``sources`` (this rank's own blocks from ``shard``), in the order they are sent."""
        me = dist.get_rank()
        for t, src in sources:
            for p in blocks.get(t, []):
                target = dest[p.hf_name].narrow(p.dim, p.dst_start, p.length)
                if src == me:
                    target.copy_(shard.narrow(p.dim, p.src_start, p.length))
                elif links is not None:
                    links[src].get(target)
                elif target.is_contiguous():
                    dist.recv(target, src=src)
                else:
                    buf = torch.empty(target.shape, dtype=self.dtype, device=target.device)
                    dist.recv(buf, src=src)
                    target.copy_(buf)
                    del buf

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
                name, gathered = next(local)
                if name != meta.name:
                    raise RuntimeError(f"WeightExporter: stage {stage} yielded {name!r}, expected {meta.name!r}")
                self._note_finite(index, gathered)
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


def _pieces(meta: ParamMeta, shard: Tensor | None) -> list[Tensor | None]:
    """The messages one TP rank's shard travels in: the shard whole, or fc1's ``[gate_t; up_t]``
    as its two halves (each lands in its own rows). ``shard`` None: one None per message."""
    count = 2 if sharding.is_fused_fc1(meta.name) and meta.split_dim is not None else 1
    if shard is None:
        return [None] * count
    return list(shard.chunk(2, dim=meta.split_dim)) if count == 2 else [shard]


def _targets(meta: ParamMeta, full: Tensor, tp: int, t: int) -> list[Tensor]:
    """Where TP rank ``t``'s messages land in the full tensor (views, in :func:`_pieces` order):
    rows ``t`` of ``tp`` (contiguous), fc1's gate and up rows of rank ``t``, or columns ``t``
    of ``tp`` of a row-parallel weight (not contiguous)."""
    dim = meta.split_dim
    if sharding.is_fused_fc1(meta.name):
        half = full.shape[dim] // 2
        per = half // tp
        return [full.narrow(dim, t * per, per), full.narrow(dim, half + t * per, per)]
    per = full.shape[dim] // tp
    return [full.narrow(dim, t * per, per)]


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
        # an engine that owns its weights' storage (the CPU engine after its first load) has
        # them written in place; others (vLLM) receive new full tensors
        engine.load_weights(exporter.buckets(into=engine.weight_destinations()))
    else:
        for _ in exporter.buckets():
            pass
    return exporter.stats
