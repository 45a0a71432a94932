"""``DataConfig``: the ``data`` section of the training config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

TRUNCATION_CHOICES: tuple[str, ...] = ("error", "left", "right")
INVALID_TEACHER_CHOICES: tuple[str, ...] = ("error", "drop")


def _as_file_list(value: str | os.PathLike[str] | list | tuple | None) -> list[str]:
    """One path, a comma-separated string of paths, or a sequence of paths -> list of str."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [p.strip() for p in str(value).split(",") if p.strip()]
    return [str(os.fspath(p)) for p in value]


@dataclass
class DataConfig:
    """``data``: where prompts come from and how they are tokenized, filtered and batched.

    Nested under the ``data`` key of the training YAML; every field is a user-facing key
    (``data.train_files=...`` on the command line).
    """

    train_files: list[str] = field(default_factory=list)
    """Parquet file(s) of training prompts; a single path (or comma-separated paths) is accepted."""
    val_files: list[str] = field(default_factory=list)
    """Parquet file(s) of validation prompts (empty: no validation)."""
    prompt_key: str = "prompt"
    """Column holding the prompt as chat messages ``[{role, content}, ...]``."""
    teacher_response_key: str = "teacher_response"
    """Column holding the teacher's response text. Present on every row: GAD mode; on none:
    standard mode; on some only: an error unless ``drop_rows_without_teacher``."""
    max_prompt_length: int = 512
    """Prompt length in tokens after the chat template; prompts are left-padded to it."""
    max_response_length: int = 512
    """Response length in tokens (student and teacher); teacher responses are right-padded or
    cut to it (the appended EOS is kept only when it fits)."""
    train_batch_size: int = 256
    """Prompts per training step (each gets ``actor_rollout_ref.rollout.n`` responses)."""
    val_batch_size: int | None = None
    """Prompts per validation batch; None: the whole validation set in one batch."""
    truncation: Literal["error", "left", "right"] = field(
        default="error", metadata={"choices": TRUNCATION_CHOICES}
    )
    """A prompt longer than ``max_prompt_length``: ``error`` names the row; ``left`` keeps its
    last tokens; ``right`` keeps its first tokens."""
    filter_overlong_prompts: bool = False
    """Drop over-long prompts at start-up instead of applying ``truncation``."""
    invalid_teacher_response: Literal["error", "drop"] = field(
        default="error", metadata={"choices": INVALID_TEACHER_CHOICES}
    )
    """A teacher response that is not a string with non-whitespace text (null means "no teacher
    response", not invalid): ``error`` names the row, ``drop`` removes the row (and counts it)."""
    drop_rows_without_teacher: bool = False
    """In a mix of rows with and without a teacher response, drop the ones without (GAD mode)
    instead of raising an error."""
    shuffle: bool = True
    """Shuffle the training prompts every epoch (validation is never shuffled)."""
    seed: int = 1
    """Seed of the per-epoch shuffle; epoch e uses the permutation seeded by (seed, e)."""
    drop_last: bool = True
    """Drop the last incomplete training batch of an epoch (validation keeps it)."""
    data_source_key: str = "data_source"
    """Column naming the data source of a row (passed to reward functions); optional."""
    reward_model_key: str = "reward_model"
    """Column of a struct whose ``ground_truth`` entry is passed to reward functions; optional."""

    def __post_init__(self) -> None:
        self.train_files = _as_file_list(self.train_files)
        self.val_files = _as_file_list(self.val_files)

    def validate(self, where: str = "data") -> None:
        """Raise ValueError naming ``<where>.<field>`` and what is valid for a bad value.

        An empty ``train_files`` passes here (a trainer may fill in demo files later);
        ``build_loaders`` requires it.
        """
        for name in ("max_prompt_length", "max_response_length", "train_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{where}.{name} must be a positive integer, got {value!r}")
        if self.val_batch_size is not None and (
            not isinstance(self.val_batch_size, int) or self.val_batch_size <= 0
        ):
            raise ValueError(
                f"{where}.val_batch_size must be a positive integer or null, got {self.val_batch_size!r}"
            )
        if self.truncation not in TRUNCATION_CHOICES:
            raise ValueError(
                f"{where}.truncation: invalid value {self.truncation!r}; valid choices: "
                + ", ".join(TRUNCATION_CHOICES)
            )
        if self.invalid_teacher_response not in INVALID_TEACHER_CHOICES:
            raise ValueError(
                f"{where}.invalid_teacher_response: invalid value {self.invalid_teacher_response!r}; "
                "valid choices: " + ", ".join(INVALID_TEACHER_CHOICES)
            )
        for name in ("prompt_key", "teacher_response_key"):
            if not getattr(self, name):
                raise ValueError(f"{where}.{name} must be a non-empty column name")
