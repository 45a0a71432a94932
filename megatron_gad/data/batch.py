"""Typed prompt batches: the training mode is decided once, where the data enters, and carried here.

A :class:`PromptBatch` holds B prompts, left-padded to ``max_prompt_length`` (P), and in GAD mode
the teacher responses, right-padded to ``max_response_length`` (R) and appended to the padded
prompts. Masks are built from token counts, never by comparing with the pad id (which
may equal EOS). Downstream code branches on ``batch.mode``, never on which keys exist.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch


class Mode(enum.Enum):
    """Training mode of a dataset: GAD (every row has a teacher response) or STANDARD (none)."""

    GAD = "gad"
    STANDARD = "standard"


@dataclass(frozen=True)
class TokenizedRow:
    """One dataset row after validation and tokenization (before padding).

    ``prompt_ids``: chat-templated prompt, already truncated to at most P tokens.
    ``teacher_response_ids``: teacher tokens + EOS, cut to at most R tokens (None in STANDARD mode).
    ``source``: ``"<file> row <i>"``, for error messages and debugging.
    """

    index: int
    source: str
    raw_prompt: list[dict[str, Any]]
    prompt_ids: list[int]
    teacher_response: str | None
    teacher_response_ids: list[int] | None
    ground_truth: Any
    data_source: str | None
    extra: dict[str, Any]


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``cumsum(mask) - 1`` clamped at 0, for a 0/1 ``mask [B, T]`` -> ``[B, T]``.

    Left padding gets position 0; trailing padding repeats the last valid position.
    """
    return (torch.cumsum(mask.long(), dim=-1) - 1).clamp(min=0)


def _mask_from_lengths(lengths: torch.Tensor, width: int, left: bool) -> torch.Tensor:
    """0/1 int64 mask ``[B, width]`` with ``lengths[b]`` ones at the right (left padding) or left."""
    cols = torch.arange(width).unsqueeze(0)
    lens = lengths.unsqueeze(1)
    keep = cols >= (width - lens) if left else cols < lens
    return keep.long()


def _pad(seqs: Sequence[Sequence[int]], width: int, pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to ``[B, width]`` (left or right) -> (ids, mask); every list must fit."""
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    if len(seqs) and int(lengths.max()) > width:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit in {width}")
    for b, s in enumerate(seqs):
        if len(s):
            t = torch.as_tensor(list(s), dtype=torch.long)
            if left:
                ids[b, width - len(s):] = t
            else:
                ids[b, : len(s)] = t
    return ids, _mask_from_lengths(lengths, width, left)


_TEACHER_TENSORS = (
    "teacher_response_ids",
    "teacher_response_mask",
    "teacher_input_ids",
    "teacher_attention_mask",
    "teacher_position_ids",
)
_PER_ROW_LISTS = ("raw_prompt", "ground_truth", "data_source")


@dataclass
class PromptBatch:
    """B prompts (and, in GAD mode, their teacher responses), ready for rollout and scoring.

    Tensors (int64): ``input_ids``, ``attention_mask``, ``position_ids`` ``[B, P]`` (prompts
    left-padded); ``index`` ``[B]`` dataset row ids; ``group_index`` ``[B]`` the prompt's group
    (0..G-1 in batch order; rows of one group are consecutive after :meth:`repeat`);
    ``repeat_index`` ``[B]`` the copy number of a row within its group (0..n-1).
    GAD only (None in STANDARD mode): ``teacher_response_ids``/``teacher_response_mask`` ``[B, R]``
    (right-padded); ``teacher_input_ids``/``teacher_attention_mask``/``teacher_position_ids``
    ``[B, P+R]`` = prompt followed by teacher response; ``teacher_response`` texts.
    Per-row lists: ``raw_prompt`` (chat messages), ``ground_truth``, ``data_source``; ``extra``
    maps each passthrough column to its per-row list.
    """

    mode: Mode
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    group_index: torch.Tensor
    repeat_index: torch.Tensor
    raw_prompt: list[list[dict[str, Any]]]
    ground_truth: list[Any]
    data_source: list[str | None]
    extra: dict[str, list[Any]] = field(default_factory=dict)
    teacher_response: list[str] | None = None
    teacher_response_ids: torch.Tensor | None = None
    teacher_response_mask: torch.Tensor | None = None
    teacher_input_ids: torch.Tensor | None = None
    teacher_attention_mask: torch.Tensor | None = None
    teacher_position_ids: torch.Tensor | None = None

    def extra_infos(self) -> list[dict | None]:
        """Each row's ``extra_info`` column (None where the data has none): the ``extra_info``
        argument of a reward function, as verl passes it."""
        return list(self.extra.get("extra_info", [None] * len(self)))

    def __post_init__(self) -> None:
        has_teacher = [getattr(self, n) is not None for n in (*_TEACHER_TENSORS, "teacher_response")]
        if self.mode is Mode.GAD and not all(has_teacher):
            raise ValueError("a GAD PromptBatch needs every teacher_* field")
        if self.mode is Mode.STANDARD and any(has_teacher):
            raise ValueError("a STANDARD PromptBatch carries no teacher_* field")
        b = self.input_ids.shape[0]
        for name in ("attention_mask", "position_ids", "index", "group_index", "repeat_index"):
            if getattr(self, name).shape[0] != b:
                raise ValueError(f"PromptBatch.{name} has {getattr(self, name).shape[0]} rows, expected {b}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        """P, the padded prompt width."""
        return self.input_ids.shape[1]

    @property
    def response_length(self) -> int | None:
        """R, the padded teacher-response width (None in STANDARD mode)."""
        return None if self.teacher_response_ids is None else self.teacher_response_ids.shape[1]

    def select(self, rows: torch.Tensor | Sequence[int]) -> "PromptBatch":
        """A new batch of the given rows (in that order); group and repeat ids are kept."""
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        picks = idx.tolist()
        updates: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                updates[f.name] = value.index_select(0, idx.to(value.device))
            elif isinstance(value, list):
                updates[f.name] = [value[i] for i in picks]
        updates["extra"] = {k: [v[i] for i in picks] for k, v in self.extra.items()}
        return replace(self, **updates)

    def repeat(self, n: int) -> "PromptBatch":
        """Each row ``n`` times consecutively (row0 x n, row1 x n, ...) -> ``n * B`` rows.

        The teacher data is repeated alongside; ``group_index`` keeps each prompt's group and
        ``repeat_index`` numbers the copies 0..n-1 (so GRPO groups and the
        ``critic.teacher_repeat`` diagnostic can be read off the batch).
        """
        if n < 1:
            raise ValueError(f"repeat(n) needs n >= 1, got {n}")
        out = self.select(torch.arange(len(self)).repeat_interleave(n))
        copy = torch.arange(n, dtype=torch.long).repeat(len(self)).to(out.repeat_index.device)
        out.repeat_index = out.repeat_index * n + copy
        return out


def collate_rows(
    rows: Sequence[TokenizedRow],
    mode: Mode,
    max_prompt_length: int,
    max_response_length: int,
    pad_token_id: int,
) -> PromptBatch:
    """Pad ``rows`` into a :class:`PromptBatch` of B = len(rows) prompts.

    Prompts are left-padded to ``max_prompt_length`` (P); in GAD mode teacher responses are
    right-padded to ``max_response_length`` (R) and appended to the padded prompts
    (``teacher_input_ids [B, P+R]``). Masks come from the token counts; position ids from masks.
    """
    if not rows:
        raise ValueError("collate_rows needs at least one row")
    input_ids, attention_mask = _pad([r.prompt_ids for r in rows], max_prompt_length, pad_token_id, left=True)
    b = len(rows)
    extra_keys = list(dict.fromkeys(k for r in rows for k in r.extra))
    batch: dict[str, Any] = dict(
        mode=mode,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        index=torch.tensor([r.index for r in rows], dtype=torch.long),
        group_index=torch.arange(b, dtype=torch.long),
        repeat_index=torch.zeros(b, dtype=torch.long),
        raw_prompt=[r.raw_prompt for r in rows],
        ground_truth=[r.ground_truth for r in rows],
        data_source=[r.data_source for r in rows],
        extra={k: [r.extra.get(k) for r in rows] for k in extra_keys},
    )
    if mode is Mode.GAD:
        if any(r.teacher_response_ids is None for r in rows):
            raise ValueError("GAD mode needs a teacher response on every row")
        resp_ids, resp_mask = _pad(
            [r.teacher_response_ids for r in rows], max_response_length, pad_token_id, left=False
        )
        full_mask = torch.cat([attention_mask, resp_mask], dim=1)
        batch.update(
            teacher_response=[r.teacher_response for r in rows],
            teacher_response_ids=resp_ids,
            teacher_response_mask=resp_mask,
            teacher_input_ids=torch.cat([input_ids, resp_ids], dim=1),
            teacher_attention_mask=full_mask,
            teacher_position_ids=position_ids_from_mask(full_mask),
        )
    return PromptBatch(**batch)


# ----------------------------------------------------------------------------- loading order


class ResumableSampler:
    """Deterministic, resumable batch order over ``num_rows`` rows.

    Epoch ``e`` visits the rows in the permutation seeded by ``(seed, e)`` (or in order when not
    shuffling), ``batch_size`` at a time. ``state_dict()`` records the epoch and how many
    batches of it were handed out, so a run restored with ``load_state_dict()`` continues with
    exactly the next batch. Every rank that builds the same sampler gets the same order.
    """

    def __init__(self, num_rows: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_rows, self.batch_size = num_rows, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        """The row order ``[num_rows]`` of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def __iter__(self) -> Iterator[list[int]]:
        """The remaining batches (lists of row ids) of the current epoch.

        The state always points at the next batch to hand out: handing out the last batch of
        an epoch already advances ``epoch`` (and resets ``position``), so a checkpoint taken
        while that batch is being trained on resumes at the start of the next epoch.
        """
        n = len(self)
        if self.position >= n:  # an epoch fully handed out (e.g. a state saved by hand)
            self.epoch, self.position = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.position < n:
            start = self.position * self.batch_size
            batch = order[start : start + self.batch_size].tolist()
            self.position += 1
            if self.position == n:
                self.epoch, self.position = self.epoch + 1, 0
                yield batch
                return
            yield batch

    def state_dict(self) -> dict[str, int | bool]:
        """Where the order stands (plus what it was built from, checked on load)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state``; ValueError if it was saved for a different dataset or batch size."""
        for key in ("num_rows", "batch_size", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: it was saved with {key}={state[key]!r}, "
                    f"now {key}={getattr(self, key)!r}"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class BatchSource(Protocol):
    """What a loader needs from a dataset (see ``megatron_gad.data.dataset.PromptDataset``)."""

    mode: Mode

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> PromptBatch: ...


class PromptLoader:
    """Iterates one epoch of :class:`PromptBatch` es per ``for`` loop, resumably.

    ``for batch in loader`` yields the rest of the current epoch (``loader.epoch`` advances as
    its last batch is handed out). Checkpoint ``state_dict()`` after a step and
    ``load_state_dict()`` it to resume with the next batch. With ``restart_each_pass`` (the
    validation loader) every ``for`` loop starts again at the first batch.
    """

    def __init__(
        self,
        dataset: BatchSource,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        restart_each_pass: bool = False,
    ) -> None:
        self.dataset = dataset
        self.sampler = ResumableSampler(len(dataset), batch_size, shuffle, seed, drop_last)
        self.restart_each_pass = restart_each_pass

    @property
    def mode(self) -> Mode:
        """The dataset's mode (GAD or STANDARD)."""
        return self.dataset.mode

    @property
    def epoch(self) -> int:
        """The current epoch (0-based)."""
        return self.sampler.epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.sampler)

    def __iter__(self) -> Iterator[PromptBatch]:
        if self.restart_each_pass:
            self.sampler.position = 0
        for indices in self.sampler:
            yield self.dataset.batch(indices)

    def state_dict(self) -> dict[str, Any]:
        """The sampler state (epoch, position and what it was built from)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the order saved by :meth:`state_dict`."""
        self.sampler.load_state_dict(state)
