"""Megatron ``dist_checkpointing`` save/load of model chunks (any TP/PP layout loads any other).

Called collectively on every rank. The target directory is created before saving (megatron-core
requires it to exist).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from megatron_gad.errors import UserError
from megatron_gad.io import atomic_write_text, remove_dir, replace_dir
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


# --------------------------------------------------------------------------------------------
# Training checkpoints: models + optimizers of every role, trainer state, RNG; atomic marker.
# --------------------------------------------------------------------------------------------

LATEST_FILE = "latest_checkpointed_iteration.txt"
_STEP_DIR = "global_step_{}"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


def _role_state(chunks: Sequence[torch.nn.Module], optimizer, loading: bool) -> dict:
    model_sd = model_sharded_state_dict(chunks)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sharded_state_dict(chunks), is_loading=loading)
    return state


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_training_checkpoint(root: str, step: int, roles: dict[str, tuple], trainer_state: dict) -> str:
    """Save ``roles`` (name -> (chunks, optimizer or None)) and ``trainer_state`` for ``step``.

    Collective over all ranks. Writes into ``global_step_<step>.tmp``, renames it to
    ``global_step_<step>`` once every rank has finished, and only then replaces
    ``latest_checkpointed_iteration.txt`` (atomically): a run killed at any moment leaves the
    marker on the last complete checkpoint. Returns the checkpoint directory.
    """
    import json

    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    final = os.path.join(root, _STEP_DIR.format(step))
    tmp = final + ".tmp"
    if rank == 0:
        remove_dir(tmp)
        os.makedirs(tmp)
    torch.distributed.barrier()
    for name, (chunks, optimizer) in roles.items():
        os.makedirs(os.path.join(tmp, name), exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(_role_state(chunks, optimizer, loading=False), os.path.join(tmp, name))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f)
    torch.distributed.barrier()
    if rank == 0:
        # A final saved earlier (the same step saved again, e.g. after resuming from an older
        # checkpoint) goes to <final>.old until the new one is in place; clean_incomplete
        # restores it after a kill in between.
        replace_dir(tmp, final)
        atomic_write_text(os.path.join(root, LATEST_FILE), str(step))
    torch.distributed.barrier()
    return final


def resolve_resume(root: str, resume_mode: str) -> str | None:
    """The checkpoint directory to resume from: ``auto`` (the latest marker, if any),
    ``disable`` (None), or an explicit ``global_step_<N>`` path (must exist)."""
    if resume_mode == "disable":
        return None
    if resume_mode == "auto":
        marker = os.path.join(root, LATEST_FILE)
        if not os.path.exists(marker):
            return None
        step = open(marker).read().strip()
        path = os.path.join(root, _STEP_DIR.format(step))
        if not step.isdigit() or not os.path.isdir(path):
            raise CheckpointError(f"{marker} names step {step!r} but {path} is not a complete checkpoint")
        return path
    if not os.path.isdir(resume_mode) or not os.path.exists(os.path.join(resume_mode, "trainer_state.json")):
        raise CheckpointError(f"trainer.resume_mode={resume_mode!r} is not a complete checkpoint directory")
    return resume_mode


def load_training_checkpoint(path: str, roles: dict[str, tuple]) -> dict:
    """Load every role's model and optimizer and this rank's RNG state from ``path`` (collective);
    return the trainer state saved with it."""
    import json

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    for name, (chunks, optimizer) in roles.items():
        role_dir = os.path.join(path, name)
        if not os.path.isdir(role_dir):
            raise CheckpointError(f"checkpoint {path} has no state for role {name!r}")
        try:
            state = dist_checkpointing.load(_role_state(chunks, optimizer, loading=True), role_dir)
        except CheckpointingException as exc:  # saved by another model or layout of tensors
            raise CheckpointError(f"checkpoint {role_dir} does not match this run's {name}: {exc}") from None
        unwrap(chunks[0]).load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    rng = os.path.join(path, f"rng_rank{torch.distributed.get_rank()}.pt")
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    state_file = os.path.join(path, "trainer_state.json")
    try:
        with open(state_file) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:  # missing, or torn / not JSON
        raise CheckpointError(f"{state_file} cannot be read: {exc}") from None


def clean_incomplete(root: str) -> list[str]:
    """Recover from a run killed while saving (rank 0 only): remove ``global_step_*.tmp``
    directories, and put back a ``global_step_<N>.old`` (the previous save of the same step,
    moved aside by :func:`megatron_gad.io.replace_dir`) whose replacement never arrived. Returns the paths removed."""
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if d.startswith("global_step_")]
    stale = [os.path.join(root, d) for d in names if d.endswith(".tmp")]
    for path in stale:
        remove_dir(path)
    for old in (os.path.join(root, d) for d in names if d.endswith(".old")):
        final = old[: -len(".old")]
        if os.path.isdir(final):
            remove_dir(old)
            stale.append(old)
        else:
            os.rename(old, final)
    return stale
