"""Typed batches the engines consume: ``[prompt | response]`` sequences and per-token PPO data.

Layout (every tensor has the rows ``B`` first): ``input_ids`` / ``attention_mask`` /
``position_ids`` ``[B, P + R]`` hold a LEFT-padded prompt of ``P`` columns followed by a
RIGHT-padded response of ``R`` columns; ``response_mask`` ``[B, R]`` marks the valid response
tokens. ``responses`` is ``input_ids[:, P:]``. Every rank of a data-parallel replica (all its TP
ranks and PP stages) must be given the SAME batch: the first stage reads the ids, the last stage
reads the masks and the PPO tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import Tensor

from megatron_gad.models.inputs import position_ids_from_mask

B = TypeVar("B")


@dataclass
class SequenceBatch:
    """Prompt + response sequences (see the module docstring for shapes)."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    response_mask: Tensor

    @classmethod
    def from_ids(cls, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> "SequenceBatch":
        """Build with position ids counted over the valid tokens (left padding gets 0)."""
        return cls(input_ids, attention_mask, position_ids_from_mask(attention_mask), response_mask)

    def __post_init__(self) -> None:
        rows, seq = self.input_ids.shape
        for name in ("attention_mask", "position_ids"):
            if tuple(getattr(self, name).shape) != (rows, seq):
                raise ValueError(f"{name} must have shape {(rows, seq)} like input_ids, got "
                                 f"{tuple(getattr(self, name).shape)}")
        if self.response_mask.dim() != 2 or self.response_mask.shape[0] != rows or self.response_mask.shape[1] >= seq:
            raise ValueError(f"response_mask must be [B={rows}, R] with R < sequence length {seq}, got "
                             f"{tuple(self.response_mask.shape)}")

    @property
    def rows(self) -> int:
        """Number of sequences B."""
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        """P: the prompt columns (sequence length minus response columns)."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def responses(self) -> Tensor:
        """Response token ids ``[B, R]``."""
        return self.input_ids[:, self.prompt_length:]


@dataclass
class PolicyBatch:
    """What one actor PPO/GSPO update needs: sequences and ``[B, R]`` rollout tensors."""

    seq: SequenceBatch
    old_log_probs: Tensor | None
    """Log-probs of the responses under the policy that generated them (same temperature); None
    in a strictly on-policy update (:meth:`ActorEngine.update_on_policy`), where they are the
    current log-probs, detached from the training forward."""
    advantages: Tensor
    """Per-token advantages (GRPO: the sequence advantage broadcast over its tokens)."""
    ref_log_probs: Tensor | None = None
    """Reference-model log-probs; required when ``use_kl_loss``."""

    @property
    def rows(self) -> int:
        return self.seq.rows


@dataclass
class ValueBatch:
    """What one critic value (PPO) update needs: sequences and ``[B, R]`` targets."""

    seq: SequenceBatch
    old_values: Tensor
    """Values at rollout time (the clip centre)."""
    returns: Tensor
    """GAE returns."""

    @property
    def rows(self) -> int:
        return self.seq.rows


@dataclass
class SftBatch:
    """Teacher-forced sequences for supervised fine-tuning: ``[B, S]`` tensors; ``loss_mask``
    marks the TARGET tokens (the teacher response), whose log-prob comes from the previous
    position's logits."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    loss_mask: Tensor

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class PairBatch:
    """Aligned student / teacher sequences for the discriminator: row i of each is one pair.

    The two may differ in response length; :meth:`stacked` right-pads the shorter one.
    """

    student: SequenceBatch
    teacher: SequenceBatch

    def __post_init__(self) -> None:
        if self.student.rows != self.teacher.rows or self.student.prompt_length != self.teacher.prompt_length:
            raise ValueError(
                f"student and teacher batches must align row by row with the same prompt columns; got "
                f"{self.student.rows} vs {self.teacher.rows} rows, P={self.student.prompt_length} vs "
                f"{self.teacher.prompt_length}"
            )

    @property
    def rows(self) -> int:
        return self.student.rows

    def stacked(self) -> SequenceBatch:
        """One ``[2B, P + R_max]`` batch: student rows then teacher rows (right-padded with masked
        tokens, which causal attention never lets a valid token see)."""
        width = max(self.student.response_mask.shape[1], self.teacher.response_mask.shape[1])
        parts = [_pad_response(b, width) for b in (self.student, self.teacher)]
        return SequenceBatch(*(torch.cat([getattr(p, f.name) for p in parts])
                               for f in dataclasses.fields(SequenceBatch)))


def _pad_response(batch: SequenceBatch, width: int) -> SequenceBatch:
    extra = width - batch.response_mask.shape[1]
    if extra == 0:
        return batch
    pad = lambda t: torch.nn.functional.pad(t, (0, extra))  # noqa: E731
    return SequenceBatch(pad(batch.input_ids), pad(batch.attention_mask), pad(batch.position_ids),
                         pad(batch.response_mask))


def model_inputs(batch: object) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, position_ids, attention_mask [B, S])`` of the sequences a batch runs."""
    if isinstance(batch, (PolicyBatch, ValueBatch)):
        batch = batch.seq
    elif isinstance(batch, PairBatch):
        batch = batch.stacked()
    if not isinstance(batch, (SequenceBatch, SftBatch)):
        raise TypeError(f"no model inputs in a {type(batch).__name__}")
    return batch.input_ids, batch.position_ids, batch.attention_mask


def _map_tensors(batch: B, fn: Callable[[Tensor], Tensor]) -> B:
    """A batch of the same type with ``fn`` applied to every tensor field (nested batches recursed)."""
    values = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            value = fn(value)
        elif dataclasses.is_dataclass(value):
            value = _map_tensors(value, fn)
        values[f.name] = value
    return type(batch)(**values)


def slice_rows(batch: B, start: int, stop: int) -> B:
    """Rows ``[start, stop)`` of any batch above (tensor fields sliced, nested batches recursed)."""
    return _map_tensors(batch, lambda t: t[start:stop])


def take_rows(batch: B, index: Tensor) -> B:
    """The rows ``index`` (int64 ``[k]``) of any batch above, in that order."""
    return _map_tensors(batch, lambda t: t[index.to(t.device)])


def shuffled(batch: B, seed: int) -> B:
    """``batch`` with its rows permuted by a CPU generator seeded with ``seed``: the same
    permutation on every rank that passes the same seed (all ranks of a data-parallel replica)."""
    return take_rows(batch, permutation(batch.rows, seed))


def permutation(rows: int, seed: int) -> Tensor:
    """The row permutation :func:`shuffled` applies for ``seed`` (int64 ``[rows]``)."""
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed))


def by_length(seq: SequenceBatch) -> Tensor:
    """The row order by response length, then prompt length (int64 ``[B]``, stable): rows of
    similar lengths become neighbours, so consecutive micro-batches need fewer padding columns."""
    response = seq.response_mask.sum(1).long()
    prompt = seq.attention_mask[:, :seq.prompt_length].sum(1).long()
    return torch.sort(response * (seq.prompt_length + 1) + prompt, stable=True).indices


def split_rows(batch: B, size: int, what: str) -> list[B]:
    """Split into consecutive pieces of ``size`` rows; ``what`` names the setting in the error."""
    rows = batch.rows
    if size < 1 or rows % size:
        raise ValueError(f"{what}={size} must be >= 1 and divide the {rows} local rows")
    return [slice_rows(batch, i, i + size) for i in range(0, rows, size)]


def _kept_columns(mask: Tensor, prompt: int) -> tuple[int, int]:
    """(first prompt column any row uses, response columns up to the last any row uses) of a
    ``[B, prompt + R]`` attention mask; at least one column of each is kept."""
    used = mask.bool().any(0)
    prompt_used = torch.nonzero(used[:prompt]).flatten()
    first = int(prompt_used[0]) if prompt_used.numel() else prompt - 1
    response_used = torch.nonzero(used[prompt:]).flatten()
    width = int(response_used[-1]) + 1 if response_used.numel() else 1
    return min(first, prompt - 1), width


def _trim_sequences(batch: SequenceBatch, first: int, width: int) -> SequenceBatch:
    p = batch.prompt_length
    cut = lambda t: t[:, first:p + width]  # noqa: E731
    return SequenceBatch(cut(batch.input_ids), cut(batch.attention_mask), cut(batch.position_ids),
                         batch.response_mask[:, :width])


def _trim_one(batch: B, first: int, width: int, teacher: tuple[int, int] | None = None) -> B:
    """``batch`` without the prompt columns before ``first`` and the response columns from
    ``width`` on (every ``[B, R]`` tensor is cut alike)."""
    if isinstance(batch, SequenceBatch):
        return _trim_sequences(batch, first, width)
    if isinstance(batch, (PolicyBatch, ValueBatch)):
        values = {}
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            if isinstance(value, SequenceBatch):
                value = _trim_sequences(value, first, width)
            elif isinstance(value, Tensor):
                value = value[:, :width]
            values[f.name] = value
        return type(batch)(**values)
    if isinstance(batch, PairBatch):
        return PairBatch(_trim_sequences(batch.student, first, width), _trim_sequences(batch.teacher, first, teacher[1]))
    if isinstance(batch, SftBatch):
        stop = first + width  # here ``first`` / ``width``: the kept columns of the whole sequence
        return SftBatch(*(getattr(batch, f.name)[:, first:stop] for f in dataclasses.fields(SftBatch)))
    raise TypeError(f"cannot trim a {type(batch).__name__}")


def trim_padding(batches: list[B]) -> list[B]:
    """The same batches without the columns that are padding in EVERY row of every batch: the
    leading prompt columns and the trailing response columns (an SFT batch: the leading and
    trailing sequence columns). All batches keep one shape, as a pipeline schedule needs.

    What a model computes at a valid token is unchanged: a left-padding column is masked out of
    attention and holds position 0, and a trailing padding column comes after every valid token
    (causal attention). Outputs per response token come back ``R'`` columns wide (``R' <= R``);
    :func:`pad_responses` restores the width."""
    if not batches:
        return batches
    kind = batches[0]
    if isinstance(kind, SftBatch):
        used = torch.stack([b.attention_mask.bool().any(0) for b in batches]).any(0)
        cols = torch.nonzero(used).flatten()
        if not cols.numel():
            return batches
        first, last = int(cols[0]), int(cols[-1]) + 1
        return [_trim_one(b, first, last - first) for b in batches]
    seqs = [b.student if isinstance(b, PairBatch) else b.seq if isinstance(b, (PolicyBatch, ValueBatch)) else b
            for b in batches]
    prompt = seqs[0].prompt_length
    spans = [_kept_columns(s.attention_mask, prompt) for s in seqs]
    first, width = min(f for f, _ in spans), max(w for _, w in spans)
    teacher = None
    if isinstance(kind, PairBatch):
        tspans = [_kept_columns(b.teacher.attention_mask, prompt) for b in batches]
        first = min(first, min(f for f, _ in tspans))
        teacher = (first, max(w for _, w in tspans))
    return [_trim_one(b, first, width, teacher) for b in batches]


def pad_responses(values: Tensor, width: int) -> Tensor:
    """Right-pad dimension 1 of per-response-token outputs ``[B, R', ...]`` with zeros to ``width``."""
    extra = width - values.shape[1]
    if extra <= 0:
        return values
    pad = torch.zeros((values.shape[0], extra, *values.shape[2:]), dtype=values.dtype, device=values.device)
    return torch.cat([values, pad], dim=1)


def to_device(batch: B, device: torch.device) -> B:
    """Move every tensor of a batch to ``device`` (no copy when already there)."""
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True))
