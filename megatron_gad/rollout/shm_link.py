"""Shared-memory channels between the CPU ranks of one host, for the weight export.

:func:`connect_links` sets up, once, one segment from every sending rank of a model-parallel group
to its one destination rank: the sender creates a file in :data:`SHM_DIR`, the destination maps
it, and every file is unlinked as soon as both ends hold their mappings, so nothing stays behind
in ``/dev/shm`` (a process killed during those few calls can leave one file). A :class:`ShmLink`
then carries one sender's shards to the destination (see its docstring); gloo carries only
counters. :func:`connect_arena` sets up, once, one segment that the destination makes and every
rank of the group maps whole: the exporter keeps the engine's weights there, so that each sender
writes its blocks straight into their final place. Used by
:class:`megatron_gad.rollout.weight_export.WeightExporter` under its ``auto`` transport on CPU.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

SHM_DIR = "/dev/shm"
SHM_SLOT_BYTES = 32 * 1024**2
"""Bytes of each of the two slots of a shared-memory link (at most ``bucket_bytes``)."""


def nbytes(t: Tensor) -> int:
    """The bytes of ``t``'s elements."""
    return t.numel() * t.element_size()


def _room_for(size: int) -> str:
    """Why :data:`SHM_DIR` cannot hold ``size`` more bytes, or "" when it can. A segment is a
    sparse file: one larger than the room left would be made, and the process killed by SIGBUS
    when it writes past that room, so the room is checked first."""
    stat = os.statvfs(SHM_DIR)
    free = stat.f_bavail * stat.f_frsize
    return "" if size <= free else f"{SHM_DIR} has {free} bytes free, the segment needs {size}"


def connect_links(me: int, ranks: list[int], dsts: list[int], slot: int, group: Any) -> dict[int, ShmLink] | None:
    """This rank's links (peer rank -> :class:`ShmLink`, two slots of ``slot`` bytes each) in the
    model-parallel ``group`` of ``ranks`` with the one destination rank ``dsts[0]``, or None on
    every rank when any rank cannot take part (no writable :data:`SHM_DIR`, too little room in it,
    a segment that cannot be made or mapped, ranks on several hosts): the caller then sends over gloo. Collective over
    ``group``."""
    links: dict[int, ShmLink] = {}
    made: dict[int, str] = {}
    error = ""
    try:
        if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK):
            error = _room_for(2 * slot * (len(ranks) - 1))  # every sender's segment
            for dst in dsts if not error else []:
                if dst != me:
                    made[dst] = os.path.join(SHM_DIR, f"mgad-weights-{uuid.uuid4().hex}-{me}-{dst}")
                    segment = torch.from_file(made[dst], shared=True, size=2 * slot, dtype=torch.uint8)
                    links[dst] = ShmLink(segment, dst, sending=True)
        else:
            error = f"{SHM_DIR} is not a writable directory"
    except (OSError, RuntimeError) as exc:
        error = f"cannot create a shared-memory segment in {SHM_DIR}: {exc}"
    offers: list[Any] = [None] * len(ranks)
    dist.all_gather_object(offers, (me, socket.gethostname(), made, error), group=group)
    hosts = {host for _, host, _, _ in offers}
    if len(hosts) > 1:
        error = error or f"the model-parallel group spans {len(hosts)} hosts"
    if not error and not any(e for *_, e in offers) and me in dsts:
        try:  # map only files that exist (from_file would create a missing one)
            for src, _, paths, _ in offers:
                if src != me:
                    if not os.path.isfile(paths[me]):
                        raise FileNotFoundError(paths[me])
                    segment = torch.from_file(paths[me], shared=True, size=2 * slot, dtype=torch.uint8)
                    links[src] = ShmLink(segment, src, sending=False)
        except (OSError, RuntimeError, KeyError) as exc:
            error = f"cannot map a peer's shared-memory segment: {exc!r}"
    errors: list[Any] = [None] * len(ranks)
    dist.all_gather_object(errors, error, group=group)  # every rank has mapped what it maps
    for path in made.values():
        os.unlink(path)
    return None if any(errors) else links


def connect_arena(me: int, ranks: list[int], dst: int, size: int, group: Any) -> Tensor | None:
    """A shared-memory segment of ``size`` bytes (uint8) made by rank ``dst`` and mapped by
    every rank of the model-parallel ``group`` of ``ranks`` (on one host), or None on every rank
    when any rank cannot take part (too little room in :data:`SHM_DIR`, a segment that cannot
    be made or mapped; the caller then keeps its links). The file is unlinked once
    every rank holds its mapping. Collective over ``group``."""
    path, error = "", ""
    segment: Tensor | None = None
    if me == dst:
        path = os.path.join(SHM_DIR, f"mgad-arena-{uuid.uuid4().hex}-{me}")
        try:
            error = _room_for(size)
            if not error:
                segment = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        except (OSError, RuntimeError) as exc:
            error = f"cannot create a {size}-byte shared-memory segment in {SHM_DIR}: {exc}"
        if error:
            path = ""
    offers: list[Any] = [None] * len(ranks)
    dist.all_gather_object(offers, (me, path, error), group=group)
    made = next((p for r, p, _ in offers if r == dst), "")
    if not error and not any(e for *_, e in offers) and me != dst:
        try:  # map only a file that exists (from_file would create a missing one)
            if not os.path.isfile(made):
                raise FileNotFoundError(made)
            segment = torch.from_file(made, shared=True, size=size, dtype=torch.uint8)
        except (OSError, RuntimeError) as exc:
            error = f"cannot map the shared-memory segment {made}: {exc!r}"
    errors: list[Any] = [None] * len(ranks)
    dist.all_gather_object(errors, error, group=group)  # every rank has mapped it
    if path:
        os.unlink(path)
    return None if any(errors) or any(e for *_, e in offers) else segment


class ShmLink:
    """One sender -> one destination channel through a shared-memory segment (ranks on one host).

    The segment has two slots of ``slot_bytes``; messages are split along dim 0 into pieces that
    fit a slot and packed into the slots in turn (64-byte aligned), by the same rule on both
    ends, so only counters travel over gloo: after each piece the sender posts how many pieces
    it has written, after copying each out the destination posts how many it has read, and the
    sender reuses a slot only once every piece of the round before last was read. Pieces are
    announced and acknowledged one by one, never held back, so a rank that is destination and
    sender at once cannot wait on a peer that waits on it. Each byte is copied twice (into the
    segment, and out of it into its place), with no socket in between.
    """

    ALIGN = 64
    WRITTEN, READ = 71, 72
    """gloo tags of the two counters (two links may join the same pair of ranks, one each way)."""
    ARENA_MODE, ARENA_WRITTEN = 73, 74
    """gloo tags of the exporter's arena messages: the destination's choice for one export, and
    a sender's count of parameters written into the arena."""

    def __init__(self, segment: Tensor, peer: int, sending: bool) -> None:
        self.slots = segment.chunk(2)
        self.slot_bytes = self.slots[0].numel()
        self.peer, self.sending = peer, sending
        self._works: list[tuple[Any, Tensor]] = []
        self._reset()

    def _reset(self) -> None:
        self.round, self.offset = 0, 0
        self.done = 0  # pieces written (sender) or read (destination)
        self.seen = 0  # pieces the peer has read (sender) or written (destination)
        self.round_ends: list[int] = []  # sender: pieces written up to the end of each full round

    def _pieces(self, t: Tensor) -> list[Tensor]:
        """``t`` (a message, or the place it lands) in pieces along dim 0 that fit one slot."""
        if t.dim() == 0 or t.numel() == 0:
            return [t]
        rows = max(1, self.slot_bytes // max(1, nbytes(t) // t.shape[0]))
        return list(t.split(rows, dim=0))

    def _place(self, nbytes: int) -> Tensor:
        """Claim ``nbytes`` in the current slot, moving to the next round when they do not fit."""
        if self.offset and self.offset + nbytes > self.slot_bytes:
            self.round_ends.append(self.done)
            self.round, self.offset = self.round + 1, 0
            if self.sending and self.round >= 2:  # the slot is reused: its last round must be read
                self._wait_read(self.round_ends[self.round - 2])
        region = self.slots[self.round % 2].narrow(0, self.offset, nbytes)
        self.offset += -(-nbytes // self.ALIGN) * self.ALIGN
        return region

    def _post(self) -> None:
        note = torch.tensor([self.done])
        tag = self.WRITTEN if self.sending else self.READ
        self._works.append((dist.isend(note, dst=self.peer, tag=tag), note))

    def _wait_peer(self, count: int) -> None:
        """Block until the peer's counter reaches ``count``."""
        buf = torch.empty(1, dtype=torch.int64)
        tag = self.READ if self.sending else self.WRITTEN
        while self.seen < count:
            dist.recv(buf, src=self.peer, tag=tag)
            self.seen = int(buf)

    _wait_read = _wait_peer

    def put(self, message: Tensor) -> None:
        """Sender: copy ``message`` (contiguous) into the segment and announce it."""
        for piece in self._pieces(message):
            if nbytes(piece):
                self._place(nbytes(piece)).view(piece.dtype).view(piece.shape).copy_(piece)
                self.done += 1
                self._post()

    def get(self, target: Tensor) -> None:
        """Destination: copy the next message out of the segment into ``target`` (any strides)."""
        for piece in self._pieces(target):
            if nbytes(piece):
                region = self._place(nbytes(piece))
                self._wait_peer(self.done + 1)
                piece.copy_(region.view(piece.dtype).view(piece.shape))
                self.done += 1
                self._post()

    def close(self) -> None:
        """End of one export: the sender waits until everything it wrote was read; both ends
        complete their posts and start the next export from the first slot."""
        if self.sending:
            self._wait_read(self.done)
        for work, _ in self._works:
            work.wait()
        self._works.clear()
        self._reset()
