"""Parquet prompt datasets: reading, validation, mode detection, tokenization, batching.

Row format (verl-style)::

    {"prompt": [{"role": "user", "content": "..."}],        # column name: data.prompt_key
     "teacher_response": "...",                             # optional; data.teacher_response_key
     "data_source": "...", "reward_model": {"ground_truth": "..."},   # optional, for rewards
     ...}                                                   # any other column: passed through

Prompts go through the tokenizer's chat template (``add_generation_prompt=True``). A teacher
response is tokenized without special tokens, EOS is appended, and the result is cut to
``max_response_length`` (so the EOS survives only when the response fits). Every user-caused
problem raises :class:`DataError` naming the file and row.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from megatron_gad.data.batch import Mode, PromptBatch, PromptLoader, TokenizedRow, collate_rows
from megatron_gad.data.config import DataConfig
from megatron_gad.errors import UserError

logger = logging.getLogger(__name__)

_MAX_LISTED_ROWS = 5
_TEMPLATE_CHUNK = 1024


class DataError(UserError, ValueError):
    """A user-caused data problem; the message names the file (and row) and what was expected."""


@dataclass
class RawRow:
    """A validated row before tokenization. ``teacher`` is None when the row has none."""

    source: str
    messages: list[dict[str, Any]]
    teacher: str | None
    ground_truth: Any
    data_source: str | None
    extra: dict[str, Any]


@dataclass
class DataStats:
    """What happened to the rows of a dataset at start-up (reported once, in the log)."""

    rows_read: int = 0
    dropped_invalid_teacher: int = 0
    dropped_without_teacher: int = 0
    dropped_overlong_prompts: int = 0
    truncated_prompts: int = 0
    truncated_teacher_responses: int = 0
    rows_kept: int = 0

    def summary(self) -> str:
        """One line: rows read and kept, then every non-zero drop/truncation count."""
        parts = [f"{self.rows_read} rows read", f"{self.rows_kept} kept"]
        for name in (
            "dropped_invalid_teacher",
            "dropped_without_teacher",
            "dropped_overlong_prompts",
            "truncated_prompts",
            "truncated_teacher_responses",
        ):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')}: {getattr(self, name)}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- reading


def read_parquet_rows(path: str) -> tuple[list[str], dict[str, list[Any]]]:
    """Read a parquet file -> (column names, column name -> per-row python values).

    Raises DataError for a missing path, a directory, or a file that is not readable parquet.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise DataError(f"{path}: data file not found")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file (expected a parquet file)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as a parquet file ({type(exc).__name__}: {exc})") from None
    return list(table.column_names), {name: _column_values(table.column(name), path, name)
                                      for name in table.column_names}


def _column_values(column: Any, path: str, name: str) -> list[Any]:
    """A parquet column as python values; DataError naming the file, row and column when a
    string in it is not valid UTF-8 (pyarrow's own error names none of them)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    for i in range(len(column)):  # the slow path, only to find the bad row
        try:
            column[i].as_py()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} row {i} column '{name}': not valid UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                            f"at offset {exc.start} of a string value)") from None
    raise DataError(f"{path} column '{name}': not valid UTF-8 text")


def _as_list(value: Any) -> list[Any] | None:
    """``value`` as a list when it is a list, tuple or numpy array; else None."""
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim == 1 else None
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def check_messages(value: Any, where: str, prompt_key: str) -> list[dict[str, Any]]:
    """Validate a prompt: a non-empty list of ``{"role": str, "content": str}`` dicts.

    Returns the messages as plain dicts; raises DataError naming ``where`` otherwise.
    """
    messages = _as_list(value)
    expected = f"expected a non-empty list of {{'role': str, 'content': str}} messages in column '{prompt_key}'"
    if not messages:
        raise DataError(f"{where}: {expected}, got {_short(value)}")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {j} is {_short(message)}; {expected}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(
                    f"{where}: message {j} has {key}={_short(message.get(key))}; {expected}"
                )
        out.append(dict(message))
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _teacher_of(value: Any, where: str, cfg: DataConfig) -> tuple[str | None, bool]:
    """(teacher text or None, valid). None input: no teacher. Invalid: error or (None, False)."""
    if value is None:
        return None, True
    if isinstance(value, str) and value.strip():
        return value, True
    if cfg.invalid_teacher_response == "error":
        raise DataError(
            f"{where}: column '{cfg.teacher_response_key}' must be a non-empty string, got "
            f"{_short(value)} (set data.invalid_teacher_response=drop to drop such rows)"
        )
    return None, False


def _ground_truth_of(value: Any) -> Any:
    if isinstance(value, dict):
        gt = value.get("ground_truth")
        return str(gt) if isinstance(gt, (int, float)) and not isinstance(gt, bool) else gt
    return None


def load_raw_rows(files: Sequence[str], cfg: DataConfig, stats: DataStats) -> list[RawRow]:
    """Read and validate every row of ``files`` (in order); drop invalid teacher rows per config."""
    rows: list[RawRow] = []
    for path in files:
        columns, data = read_parquet_rows(path)
        if cfg.prompt_key not in data:
            raise DataError(
                f"{path}: no prompt column '{cfg.prompt_key}' (data.prompt_key); "
                f"available columns: {', '.join(columns) or '(none)'}"
            )
        n = len(data[cfg.prompt_key])
        stats.rows_read += n
        special = {cfg.prompt_key, cfg.teacher_response_key, cfg.data_source_key}
        passthrough = [c for c in columns if c not in special]
        teachers = data.get(cfg.teacher_response_key, [None] * n)
        sources = data.get(cfg.data_source_key, [None] * n)
        rewards = data.get(cfg.reward_model_key, [None] * n)
        for i in range(n):
            where = f"{path} row {i}"
            messages = check_messages(data[cfg.prompt_key][i], where, cfg.prompt_key)
            teacher, valid = _teacher_of(teachers[i], where, cfg)
            if not valid:
                stats.dropped_invalid_teacher += 1
                continue
            rows.append(
                RawRow(
                    source=where,
                    messages=messages,
                    teacher=teacher,
                    ground_truth=_ground_truth_of(rewards[i]),
                    data_source=sources[i],
                    extra={c: data[c][i] for c in passthrough},
                )
            )
    if stats.rows_read == 0:
        raise DataError(f"no rows at all in {', '.join(files) or '(no files given)'}")
    return rows


def resolve_mode(rows: list[RawRow], cfg: DataConfig, stats: DataStats) -> tuple[Mode, list[RawRow]]:
    """Decide the mode once: every row with a teacher -> GAD, none -> STANDARD.

    A mix raises DataError naming the first rows without one, unless
    ``drop_rows_without_teacher`` (then they are dropped and the mode is GAD).
    """
    missing = [r for r in rows if r.teacher is None]
    if not missing:
        return Mode.GAD, rows
    if len(missing) == len(rows):
        return Mode.STANDARD, rows
    if not cfg.drop_rows_without_teacher:
        listed = "; ".join(r.source for r in missing[:_MAX_LISTED_ROWS])
        more = f" (and {len(missing) - _MAX_LISTED_ROWS} more)" if len(missing) > _MAX_LISTED_ROWS else ""
        raise DataError(
            f"{len(missing)} of {len(rows)} rows have no '{cfg.teacher_response_key}' while the others "
            f"have one (a dataset is either GAD data or standard data): {listed}{more}; "
            "set data.drop_rows_without_teacher=true to drop them"
        )
    stats.dropped_without_teacher += len(missing)
    return Mode.GAD, [r for r in rows if r.teacher is not None]


# ----------------------------------------------------------------------------- tokenizing


def encode_prompts(tokenizer: Any, rows: Sequence[RawRow]) -> list[list[int]]:
    """Chat-template token ids of every row's messages (``add_generation_prompt=True``).

    Equal to ``tokenizer.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=True)`` per row; rendered in chunks for speed. A template failure is reported
    with the row that caused it.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"the tokenizer {type(tokenizer).__name__} has no chat template")
    out: list[list[int]] = []
    for start in range(0, len(rows), _TEMPLATE_CHUNK):
        chunk = rows[start : start + _TEMPLATE_CHUNK]
        try:
            out.extend(_apply_template(tokenizer, [r.messages for r in chunk]))
        except Exception as batch_exc:  # find the row that fails, and name it
            for r in chunk:
                try:
                    _apply_template(tokenizer, [r.messages])
                except Exception as exc:
                    raise DataError(f"{r.source}: the chat template failed: {exc}") from None
            raise DataError(f"{chunk[0].source} .. {chunk[-1].source}: the chat template failed on these rows "
                            f"together but on none alone: {batch_exc}") from None
    return out


def _apply_template(tokenizer: Any, conversations: list[list[dict[str, Any]]]) -> list[list[int]]:
    ids = tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [list(map(int, x)) for x in ids]


def fit_prompt(ids: list[int], cfg: DataConfig, where: str) -> list[int]:
    """Apply ``data.truncation`` to a prompt longer than ``max_prompt_length``."""
    limit = cfg.max_prompt_length
    if len(ids) <= limit:
        return ids
    if cfg.truncation == "left":
        return ids[-limit:]
    if cfg.truncation == "right":
        return ids[:limit]
    raise DataError(
        f"{where}: the prompt has {len(ids)} tokens after the chat template, more than "
        f"data.max_prompt_length={limit} (raise it, set data.truncation=left|right, or "
        "data.filter_overlong_prompts=true)"
    )


def encode_teacher(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Teacher ids: text without special tokens + EOS, cut to ``max_length`` (EOS kept if it fits).

    Returns (ids per text, number of responses that were cut).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"the tokenizer {type(tokenizer).__name__} has no EOS token (needed for teacher responses)")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    out, cut = [], 0
    for ids in encoded:
        full = [int(t) for t in ids] + [int(eos)]
        cut += len(full) > max_length
        out.append(full[:max_length])
    return out, cut


def tokenize_rows(
    rows: list[RawRow], tokenizer: Any, cfg: DataConfig, mode: Mode, stats: DataStats
) -> list[TokenizedRow]:
    """Tokenize prompts (and teacher responses in GAD mode); filter or truncate long prompts."""
    prompt_ids = encode_prompts(tokenizer, rows)
    kept: list[tuple[RawRow, list[int]]] = []
    for row, ids in zip(rows, prompt_ids):
        if len(ids) > cfg.max_prompt_length:
            if cfg.filter_overlong_prompts:
                stats.dropped_overlong_prompts += 1
                continue
            ids = fit_prompt(ids, cfg, row.source)
            stats.truncated_prompts += 1
        kept.append((row, ids))
    teacher_ids: list[list[int] | None] = [None] * len(kept)
    if mode is Mode.GAD:
        encoded, stats.truncated_teacher_responses = encode_teacher(
            tokenizer, [r.teacher for r, _ in kept], cfg.max_response_length
        )
        teacher_ids = list(encoded)
    return [
        TokenizedRow(
            index=i,
            source=row.source,
            raw_prompt=row.messages,
            prompt_ids=ids,
            teacher_response=row.teacher if mode is Mode.GAD else None,
            teacher_response_ids=t_ids,
            ground_truth=row.ground_truth,
            data_source=row.data_source,
            extra=row.extra,
        )
        for i, ((row, ids), t_ids) in enumerate(zip(kept, teacher_ids))
    ]


# ----------------------------------------------------------------------------- dataset


class PromptDataset:
    """The validated, tokenized rows of one split (``files`` read in order), with its mode.

    Everything is read and tokenized once, at construction; the counts of dropped and truncated
    rows are logged once. ``dataset[i]`` is a :class:`TokenizedRow`; :meth:`collate` pads rows
    into a :class:`PromptBatch`.
    """

    def __init__(self, files: Sequence[str] | str, tokenizer: Any, config: DataConfig, name: str = "train") -> None:
        self.config = config
        self.name = name
        self.files = [files] if isinstance(files, str) else list(files)
        if not self.files:
            raise DataError(f"{name}: no data files given")
        self.stats = DataStats()
        raw = load_raw_rows(self.files, config, self.stats)
        self.mode, raw = resolve_mode(raw, config, self.stats)
        self.rows = tokenize_rows(raw, tokenizer, config, self.mode, self.stats)
        self.stats.rows_kept = len(self.rows)
        if not self.rows:
            raise DataError(f"{name}: no rows left in {', '.join(self.files)} ({self.stats.summary()})")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError(f"the tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token")
        self.pad_token_id = int(pad)
        altered = self.stats.rows_kept < self.stats.rows_read or self.stats.truncated_prompts or (
            self.stats.truncated_teacher_responses
        )
        logger.log(
            logging.WARNING if altered else logging.INFO,
            "%s data (%s mode) from %s: %s",
            name,
            self.mode.value,
            ", ".join(self.files),
            self.stats.summary(),
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> TokenizedRow:
        return self.rows[i]

    def collate(self, rows: Sequence[TokenizedRow]) -> PromptBatch:
        """Pad ``rows`` of this dataset into a PromptBatch (P = max_prompt_length, R = max_response_length)."""
        return collate_rows(
            rows, self.mode, self.config.max_prompt_length, self.config.max_response_length, self.pad_token_id
        )

    def batch(self, indices: Sequence[int]) -> PromptBatch:
        """The PromptBatch of the rows at ``indices`` (in that order)."""
        return self.collate([self.rows[i] for i in indices])


def build_loaders(config: DataConfig, tokenizer: Any) -> tuple[PromptLoader, PromptLoader | None]:
    """The train loader (shuffled per ``config``, ``drop_last``) and the validation loader
    (in order, every row; None without ``val_files``). Validates ``config`` first.
    """
    try:
        config.validate()
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if not config.train_files:
        raise DataError("data.train_files: at least one parquet file is required")
    train = PromptDataset(config.train_files, tokenizer, config, name="train")
    if config.drop_last and len(train) < config.train_batch_size:
        raise DataError(
            f"the training set has {len(train)} rows ({train.stats.summary()}), fewer than "
            f"data.train_batch_size={config.train_batch_size}: not one full batch"
        )
    train_loader = PromptLoader(train, config.train_batch_size, config.shuffle, config.seed, config.drop_last)
    if not config.val_files:
        return train_loader, None
    val = PromptDataset(config.val_files, tokenizer, config, name="val")
    if val.mode is not train.mode:
        raise DataError(
            f"data.val_files are {val.mode.value} data but data.train_files are {train.mode.value} data: "
            f"both must carry teacher_response, or neither"
        )
    val_loader = PromptLoader(
        val, config.val_batch_size or len(val), False, config.seed, False, restart_each_pass=True
    )
    return train_loader, val_loader
