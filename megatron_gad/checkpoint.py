"""Megatron ``dist_checkpointing`` save/load of model chunks (any TP/PP layout loads any other).

Called collectively on every rank. The target directory is created before saving (megatron-core
requires it to exist).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from megatron_gad.models.sharding import unwrap


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict:
    """The sharded state dict of this rank's model chunks (one chunk: no virtual pipeline)."""
    if len(chunks) != 1:
        raise ValueError(f"expected one model chunk per rank, got {len(chunks)}")
    return unwrap(chunks[0]).sharded_state_dict()


def save_model(chunks: Sequence[torch.nn.Module], directory: str) -> None:
    """Save the model weights of every rank into ``directory`` (collective)."""
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory)


def load_model(chunks: Sequence[torch.nn.Module], directory: str, strict: bool = True) -> None:
    """Load weights saved by :func:`save_model` at any TP/PP layout into ``chunks`` (collective)."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), directory)
    unwrap(chunks[0]).load_state_dict(state, strict=strict)
