"""The ``direct`` transport of the weight export (CPU ranks): every shard straight to the
destination rank, and on one host through shared memory.

:class:`DirectTransport` is the part of :class:`megatron_gad.rollout.weight_export.WeightExporter`
that moves shards without collectives (see that module's docstring for the whole export). With a
piece table (the actor under the default converter) each TP rank hands over the blocks of its
shard that HF tensors are made of (:func:`megatron_gad.rollout.reshard.plan_resharding` into one
engine at TP=1: q/k/v rows per query group, gate/up rows, the real vocabulary rows, a
row-parallel shard's columns), and the destination puts each block in its place:

- in the **arena** (``auto`` on CPU ranks of one host with one destination rank, when the
  consumer passed ``into``): a shared-memory segment that holds the destination's assembled HF
  tensors and that every rank of the group maps, so each sender copies its blocks straight into
  their final place, once; the destination copies its own blocks and waits for a count per
  sender. The consumer (the CPU engine) keeps the arena's tensors as its weights;
- otherwise through the :class:`~megatron_gad.rollout.shm_link.ShmLink` slots or as gloo
  messages, received straight into ``into[name]`` (the consumer's own tensor) or a new tensor.

Without a piece table (the critic, a custom converter) whole shards land in their rows of a
preallocated full Megatron tensor, which the converter then splits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_gad.models import sharding
from megatron_gad.rollout.shm_link import SHM_SLOT_BYTES, ShmLink, connect_arena, connect_links
from megatron_gad.rollout.shm_link import nbytes as _nbytes

if TYPE_CHECKING:
    from megatron_gad.rollout.weight_export import ParamMeta


class DirectTransport:
    """The direct transport's methods, mixed into ``WeightExporter``; they use its ``metadata``,
    ``_rank_grid``, ``_local_params``, ``_note_finite``, ``_note_alive``, ``_model_args`` and its
    settings (``dtype``, ``dst_ranks``, ``bucket_bytes``, ``transport``, ``role``,
    ``hf_config``), and keep their state in its ``_links``, ``_table`` and ``_arena*`` fields."""

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

    def _direct_setup(self, grid: dict[tuple[int, int], int]) -> tuple[int, int, int, int, list[int], Any, Iterator]:
        """What both direct paths start from: (this rank, its pipeline stage, TP rank, TP size,
        the destination ranks, the shared-memory links or None, this rank's parameters)."""
        from megatron.core import parallel_state as ps

        dsts = sorted(r for r in grid.values() if r in self.dst_ranks)
        links = self._shm_links() if _device().type == "cpu" else None  # the links carry host tensors
        return (dist.get_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                ps.get_tensor_model_parallel_world_size(), dsts, links, self._local_params())

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

    def _direct_full_tensors(self) -> Iterator[tuple[ParamMeta, Tensor | None]]:
        """Per parameter in global order: its full Megatron tensor in ``dtype`` on destination
        ranks of this model-parallel group, None elsewhere (the ``direct`` transport without a
        piece table: a custom ``convert``, or the critic).

        Like :meth:`_direct_hf_tensors`, but each TP rank hands its whole shard (fc1's as its
        gate and up halves) into its rows (a row-parallel shard: its columns) of a preallocated
        full tensor, which the converter then splits.
        """
        metas, grid = self.metadata(), self._rank_grid()
        me, stage, tp_rank, tp, dsts, links, local = self._direct_setup(grid)
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
                            self._recv_block(target, src, piece if src == me else None, links)
            del shard
            if in_flight >= self.bucket_bytes:  # bound what a sender runs ahead of its receivers
                _wait_all(sends)
                in_flight = 0
            yield meta, full
        _wait_all(sends)
        for link in (links or {}).values():
            link.close()

    def _direct_hf_tensors(
        self, into: Mapping[str, Tensor] | None
    ) -> Iterator[tuple[ParamMeta, list[tuple[str, Tensor]] | None]]:
        """Per parameter in global order: its HF tensors in ``dtype`` on destination ranks of this
        model-parallel group, None elsewhere (the ``direct`` transport, with a piece table).

        Every holder of a shard checks and casts it, then hands each block of it that an HF
        tensor needs (:meth:`_piece_table`: q/k/v rows per query group, fc1's gate and up rows,
        the real vocabulary rows, a row-parallel shard's columns) to each destination rank that
        does not hold it: written straight into the destination's tensor in the arena
        (:meth:`_arena_for`; the sender then posts a count), or through a shared-memory link or
        as a gloo message, which the destination puts straight into its place in the HF tensor:
        in ``into[name]`` (the engine's own storage, see :meth:`_destination`) or, failing that,
        a new tensor. A destination copies its own blocks in. A parameter held whole here that
        needs no split is yielded as views of the local shard instead (at TP=1 in the
        parameter's dtype: of the live parameter). A
        replicated parameter comes from the destination's own copy when it is on the owning
        stage, else from that stage's TP rank 0. Gloo sends are bounded to about one bucket in
        flight per rank; receives are in the global order, so no rank waits on a peer that
        waits on it.
        """
        from megatron_gad.models.hf_mapping import hf_sources, megatron_to_hf_tensors

        metas, grid, table = self.metadata(), self._rank_grid(), self._piece_table()
        args = self._model_args()
        me, stage, tp_rank, tp, dsts, links, local = self._direct_setup(grid)
        own = {p.untyped_storage().data_ptr() for _, p in self._local_params()} if into is not None else set()
        # an arena only for a consumer whose tensors take the export as they are (else it would
        # copy out of the arena at every sync and keep it as a second copy of the weights)
        fits = into is not None and all(t.dtype == self.dtype and t.device == _device() for t in into.values())
        arena = self._arena_for(fits, links, dsts)
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
                    mine = blocks.get(tp_rank if sharded else 0, [])
                    if arena is not None and mine:  # straight into the destination's tensors
                        for p in mine:
                            arena[p.hf_name].narrow(p.dim, p.dst_start, p.length).copy_(
                                shard.narrow(p.dim, p.src_start, p.length))
                        note = torch.tensor([index + 1])
                        sends.append((dist.isend(note, dst=dst, tag=ShmLink.ARENA_WRITTEN), note))
                        continue
                    for p in mine:
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
                if shard is not None and _yielded_as_views(meta, how, tp):
                    hf = megatron_to_hf_tensors(meta.name, shard, self.hf_config, self.role, args)
                else:
                    hf = [(n, arena[n] if arena is not None else self._destination(n, into, own)) for n in sources]
                    holders = ([(t, stage_ranks[t]) for t in range(tp)] if sharded
                               else [(0, me if shard is not None else stage_ranks[0])])
                    if arena is not None:
                        self._arena_receive(dict(hf), blocks, shard, holders, index)
                    else:
                        self._receive(dict(hf), blocks, shard, holders, links)
            del shard
            if in_flight >= self.bucket_bytes:  # bound what a sender runs ahead of its receivers
                _wait_all(sends)
                in_flight = 0
            yield meta, hf
        _wait_all(sends)
        for link in (links or {}).values():
            link.close()

    def _arena_names(self, dst: int) -> list[tuple[str, tuple[int, ...]]]:
        """The HF tensors the destination ``dst`` assembles (every one but those it yields as
        views of its own whole, unsplit parameters), with their shapes, in export order. Any
        rank of the group computes the same list."""
        from megatron.core import parallel_state as ps

        from megatron_gad.models.hf_mapping import hf_shape, hf_sources

        args, tp = self._model_args(), ps.get_tensor_model_parallel_world_size()
        dst_stage = next(s for (s, _), r in self._rank_grid().items() if r == dst)
        out = []
        for meta in self.metadata():
            sources, how = hf_sources(meta.name, self.hf_config, self.role, args)
            if meta.stage == dst_stage and _yielded_as_views(meta, how, tp):
                continue
            out += [(n, hf_shape(n, args, self.role)) for n in sources]
        return out

    def _arena_for(self, want: bool, links: dict[int, ShmLink] | None,
                   dsts: list[int]) -> dict[str, Tensor] | None:
        """For this export: the destination's HF tensors in a shared-memory segment every rank of
        the group has mapped (name -> tensor), so senders write their blocks in place, or None
        (the blocks travel through the links). The destination chooses, and tells each sender:
        the arena when its consumer passed ``into`` (it keeps the tensors as its weights: the
        engine rebinds to them on the first such export, a no-op later), none otherwise. The
        message also tells senders that the destination has entered the export, so its engine is
        not reading the weights they write. The segment is made on the first export that wants
        it (collective over the group) and kept; where it cannot be made, none is tried again."""
        if links is None or self._arena == {}:
            return None
        from megatron.core import parallel_state as ps

        me, dst = dist.get_rank(), dsts[0]
        choice = torch.tensor([int(want)])
        if me == dst:
            _wait_all([(dist.isend(choice, dst=peer, tag=ShmLink.ARENA_MODE), choice) for peer in links])
        else:
            dist.recv(choice, src=dst, tag=ShmLink.ARENA_MODE)
        self._arena_seen = {peer: 0 for peer in links}
        self._arena_need.clear()
        if not int(choice):
            return None
        if self._arena is None:
            item = torch.empty((), dtype=self.dtype).element_size()
            layout, size = [], 0
            for name, shape in self._arena_names(dst):
                layout.append((name, shape, size))
                size += -(-item * math.prod(shape) // ShmLink.ALIGN) * ShmLink.ALIGN
            segment = connect_arena(me, sorted(self._rank_grid().values()), dst, max(size, 1),
                                    ps.get_model_parallel_group())
            self._arena = {} if segment is None else {
                name: segment.narrow(0, offset, item * math.prod(shape)).view(self.dtype).view(shape)
                for name, shape, offset in layout}
        return self._arena or None

    def _arena_receive(self, dest: dict[str, Tensor], blocks: dict[int, list[Any]], shard: Tensor | None,
                       sources: list[tuple[int, int]], index: int) -> None:
        """Arena mode on the destination: copy this rank's own blocks of parameter ``index`` in,
        and note that every other source must have written its blocks of it (its count must
        reach ``index + 1``) before the bucket holding it is handed over (:meth:`_arena_settle`):
        the destination copies its own blocks on meanwhile instead of waiting on each."""
        me = dist.get_rank()
        for t, src in sources:
            mine = blocks.get(t, [])
            if src == me:
                for p in mine:
                    target = dest[p.hf_name].narrow(p.dim, p.dst_start, p.length)
                    target.copy_(shard.narrow(p.dim, p.src_start, p.length))
            elif mine:
                self._arena_need[src] = index + 1

    def _arena_settle(self) -> None:
        """Wait until every sender's count reaches what the tensors noted so far need (a no-op
        outside arena mode and on senders). Called before each bucket is yielded."""
        buf = torch.empty(1, dtype=torch.int64)
        for src, need in self._arena_need.items():
            while self._arena_seen[src] < need:
                dist.recv(buf, src=src, tag=ShmLink.ARENA_WRITTEN)
                self._arena_seen[src] = int(buf)
        self._arena_need.clear()

    def _checked_shard(self, index: int, meta: ParamMeta, local: Iterator[tuple[str, Tensor]],
                       stage: int) -> Tensor | None:
        """This rank's tensor of parameter ``index`` from ``local`` (its shard; under the
        ``gather`` transport the TP-gathered full tensor) in the export dtype, recorded in the
        finite check first; None when another stage owns it."""
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
                own = shard.narrow(p.dim, p.src_start, p.length) if src == me else None
                self._recv_block(dest[p.hf_name].narrow(p.dim, p.dst_start, p.length), src, own, links)

    def _recv_block(self, target: Tensor, src: int, own: Tensor | None, links: dict[int, ShmLink] | None) -> None:
        """Fill ``target`` (a view into a destination tensor) with the next block from rank
        ``src``: ``own`` when this rank holds it, else through ``src``'s link or gloo (a
        non-contiguous view through a buffer)."""
        if own is not None:
            target.copy_(own)
        elif links is not None:
            links[src].get(target)
        elif target.is_contiguous():
            dist.recv(target, src=src)
        else:
            buf = torch.empty(target.shape, dtype=self.dtype, device=target.device)
            dist.recv(buf, src=src)
            target.copy_(buf)


def _yielded_as_views(meta: ParamMeta, how: str, tp: int) -> bool:
    """Whether a destination on the parameter's own stage yields its HF tensors as views of its
    shard (held whole, nothing to split) instead of assembling them: the rule both
    :meth:`DirectTransport._direct_hf_tensors` and the arena's layout (:meth:`DirectTransport._arena_names`)
    follow, so the arena holds exactly the tensors assembled."""
    return (meta.split_dim is None or tp == 1) and how != "qkv"


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
