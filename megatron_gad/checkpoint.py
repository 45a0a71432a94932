"""Megatron ``dist_checkpointing`` save/load of model chunks (any TP/PP layout loads any other).

Called collectively on every rank. The target directory is created before saving (megatron-core
requires it to exist).
"""

from __future__ import annotations

import errno
import os
from typing import Sequence

import torch

from megatron_gad.checkpoint_integrity import (
    MANIFEST_FILE,
    STEP_DIR,
    checkpoint_problem,
    complete_steps,
    read_manifest,
    saved_world_size,
    write_manifest,
)
from megatron_gad.errors import UserError
from megatron_gad.io import atomic_write_text, remove_dir, replace_dir, write_text_fsynced
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


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


class DiskFullError(CheckpointError):
    """A checkpoint save ran out of space (ENOSPC, a disk quota or a per-process file-size limit)."""


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


def save_training_checkpoint(root: str, step: int, roles: dict[str, tuple], trainer_state: dict,
                             keep: int | None = None) -> str:
    """Save ``roles`` (name -> (chunks, optimizer or None)) and ``trainer_state`` for ``step``.

    Collective over all ranks. Writes into ``global_step_<step>.tmp``, records every file's size
    in ``manifest.json``, renames the directory to ``global_step_<step>`` once every rank has
    finished, and only then replaces ``latest_checkpointed_iteration.txt`` (atomically): a run
    killed at any moment leaves the marker on the last complete checkpoint. Each phase that can
    fail on one rank (a full disk) is agreed by every rank before the next one starts, so a failed
    save raises on every rank, leaves no partial directory and touches no earlier checkpoint; a
    full disk raises :class:`DiskFullError`. ``keep``: once the new checkpoint is complete and
    marked, delete all but the newest ``keep`` complete checkpoints. Returns the directory.
    """
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    final = os.path.join(root, STEP_DIR.format(step))
    tmp = final + ".tmp"
    try:
        _agreed(tmp, lambda: _fresh_dir(tmp) if rank == 0 else None)
        for name, (chunks, optimizer) in roles.items():
            role_dir = os.path.join(tmp, name)
            _agreed(role_dir, lambda: os.makedirs(role_dir, exist_ok=True) if rank == 0 else None)
            state = _role_state(chunks, optimizer, loading=False)
            _agreed(role_dir, lambda: dist_checkpointing.save(state, role_dir))
        _agreed(tmp, lambda: _write_rank_files(tmp, rank, trainer_state))
        manifest = os.path.join(tmp, MANIFEST_FILE)
        _agreed(manifest, lambda: write_manifest(tmp, step) if rank == 0 else None)
        # rank 0 publishes; agreed like every phase, so a failure there (the marker's write on a
        # full disk) raises on every rank instead of leaving the others waiting in a collective
        _agreed(final, lambda: _publish(root, tmp, final, step, keep) if rank == 0 else None)
    except _SaveFailed as failed:
        _report_failed_save(failed, root, tmp)
    return final


def _publish(root: str, tmp: str, final: str, step: int, keep: int | None) -> None:
    """Rank 0: rename the complete ``tmp`` into place, then point the marker at it, then prune."""
    replace_dir(tmp, final)
    atomic_write_text(os.path.join(root, LATEST_FILE), str(step))
    if keep is not None:
        prune_checkpoints(root, keep, protect=step)


def resolve_resume(root: str, resume_mode: str, notes: list[str] | None = None) -> str | None:
    """The checkpoint directory to resume from (a file-system check: call it before any model is
    built; rank 0 decides and tells the others).

    ``disable``: None. An explicit ``global_step_<N>`` path: it must be intact
    (:func:`checkpoint_problem`), else CheckpointError naming the damaged file. ``auto``: the step
    the latest marker names, or the newest ``global_step_*`` when the marker is missing, empty,
    not UTF-8 or names no directory; a damaged checkpoint is skipped for the newest intact one
    before it. One line per such event is appended to ``notes``. CheckpointError when
    checkpoints exist but none is intact: ``auto`` never silently restarts from step 0.
    """
    notes = [] if notes is None else notes
    if resume_mode == "disable":
        return None
    if resume_mode != "auto":
        problem = checkpoint_problem(resume_mode)
        if problem:
            raise CheckpointError(f"trainer.resume_mode={resume_mode!r} is not a complete checkpoint: {problem}")
        return resume_mode
    steps = complete_steps(root)
    marked = _marker_step(root, steps, notes)
    candidates = [s for s in steps if marked is None or s <= marked]
    damaged = []
    for step in reversed(candidates):
        path = os.path.join(root, STEP_DIR.format(step))
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        damaged.append(path)
        older = "; trying the one before it" if step != candidates[0] else ""
        notes.append(f"checkpoint {path} is damaged: {problem}{older}")
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {root} (damaged: {', '.join(damaged)}); repair or remove "
                              f"them, or set trainer.resume_mode=disable to start again from step 0")
    return None


def load_training_checkpoint(path: str, roles: dict[str, tuple]) -> dict:
    """Load every role's model and optimizer and this rank's RNG state from ``path`` (collective);
    return the trainer state saved with it. The RNG state of a checkpoint saved at another world
    size is not restored (the streams restart from the run's seed; the trainer says so)."""
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
    saved_world = saved_world_size(path)
    if saved_world in (None, torch.distributed.get_world_size()):
        if not os.path.exists(rng):
            raise CheckpointError(f"{rng} is missing: the RNG state of this rank was not saved")
        _set_rng_state(torch.load(rng, weights_only=False))
    state_file = os.path.join(path, "trainer_state.json")
    try:
        with open(state_file) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:  # missing, or torn / not JSON
        raise CheckpointError(f"{state_file} cannot be read: {exc}") from None


# --------------------------------------------------------------------------------------------
# Per-rank files, the latest marker, retention (manifest and integrity: checkpoint_integrity.py).
# --------------------------------------------------------------------------------------------

def _write_rank_files(tmp: str, rank: int, trainer_state: dict) -> None:
    import json

    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        write_text_fsynced(os.path.join(tmp, "trainer_state.json"), json.dumps(trainer_state))


def _marker_step(root: str, steps: list[int], notes: list[str]) -> int | None:
    """The step the latest marker names, or None (with a note when checkpoints exist) when the
    marker is missing, empty, not UTF-8 or names no checkpoint directory: then every
    ``global_step_*`` is a candidate."""
    marker = os.path.join(root, LATEST_FILE)
    if not steps:
        return None
    scan = "; scanning global_step_* instead"
    if not os.path.exists(marker):
        notes.append(f"{marker} is missing{scan}")
        return None
    with open(marker, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        notes.append(f"{marker} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}){scan}")
        return None
    if not text.isdigit():
        notes.append(f"{marker} {'is empty' if not text else f'holds {text[:40]!r}, not a step number'}{scan}")
        return None
    if int(text) not in steps:
        notes.append(f"{marker} names step {text} but {os.path.join(root, STEP_DIR.format(text))} "
                     f"does not exist{scan}")
        return None
    return int(text)


def prune_checkpoints(root: str, keep: int, protect: int | None = None) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints of ``root`` (never step ``protect``);
    return the directories deleted. Each is renamed to ``.deleting`` first, so one half-deleted
    by a kill is never taken for a checkpoint (:func:`clean_incomplete` finishes it)."""
    steps = complete_steps(root)
    doomed = [s for s in steps[: max(len(steps) - keep, 0)] if s != protect]
    removed = []
    for step in doomed:
        path = os.path.join(root, STEP_DIR.format(step))
        os.rename(path, path + ".deleting")
        remove_dir(path + ".deleting")
        removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Failed saves: every rank agrees, the partial directory goes, a full disk is named as such.
# --------------------------------------------------------------------------------------------

class _SaveFailed(Exception):
    def __init__(self, where: str, error: BaseException | None) -> None:
        super().__init__(where)
        self.where, self.error = where, error


def _agreed(where: str, fn) -> None:
    """Run ``fn()`` on this rank, then agree with every rank whether it failed anywhere (raises
    _SaveFailed on every rank then; ``error`` is None on the ranks where it succeeded)."""
    from megatron_gad.runtime.distributed import device

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    error = None
    try:
        fn()
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - reported below, after every rank knows
        error = exc
    flag = torch.tensor([0.0 if error is None else 1.0], device=device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if float(flag[0]):
        raise _SaveFailed(where, error)


_SPACE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file size limit exceeded"}
_SPACE_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                "File too large": errno.EFBIG}


def _space_error(exc: BaseException | None) -> tuple[int, str | None] | None:
    """(errno, file name or None) when ``exc`` (or an exception it wraps, also inside
    megatron-core's or torch's checkpoint exceptions) is a lack of space."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
            return e.errno, e.filename
        for text, code in _SPACE_TEXTS.items():
            if text in str(e):
                return code, None
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def _measured_space_error(tmp: str, root: str) -> int | None:
    """The lack of space a writer reported without an errno (torch's zip writer says only
    ``unexpected pos``), measured: writing a probe as large as the largest file of this save or
    of the last checkpoint (1 to 64 MiB) next to the partial directory fails with ENOSPC, EDQUOT
    or EFBIG (a per-process RLIMIT_FSIZE; SIGXFSZ ignored for the probe)."""
    import signal

    sizes = [2**20]
    for folder in (tmp, *(os.path.join(root, STEP_DIR.format(s)) for s in complete_steps(root)[-1:])):
        for sub, _, names in os.walk(folder):
            sizes += [os.path.getsize(os.path.join(sub, n)) for n in names]
    size = min(max(sizes), 64 * 2**20)
    probe = os.path.join(root, f".space_probe{os.getpid()}")
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with open(probe, "wb") as f:
            block = b"\0" * 2**20
            for _ in range(-(-size // len(block))):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc.errno if exc.errno in _SPACE_ERRNOS else None
    finally:
        signal.signal(signal.SIGXFSZ, previous)
        if os.path.exists(probe):
            os.unlink(probe)
    return None


def _report_failed_save(failed: _SaveFailed, root: str, tmp: str) -> None:
    """After a failed save phase (every rank here): rank 0 removes ``tmp`` and names the cause;
    a lack of space raises DiskFullError on every rank, anything else re-raises the original
    error where it happened (a CheckpointError naming the failing rank elsewhere)."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    local = _space_error(failed.error)
    gathered: list = [None] * world
    mine = None if failed.error is None else (local, f"{type(failed.error).__name__}: {failed.error}"[:300])
    torch.distributed.all_gather_object(gathered, mine)
    box = [None]
    if rank == 0:
        space = next((g[0] for g in gathered if g is not None and g[0] is not None), None)
        if space is None:
            code = _measured_space_error(tmp, root)
            space = None if code is None else (code, None)
        remove_dir(tmp)
        if space is not None:
            box = [_disk_full_message(root, tmp, failed.where, *space)]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise DiskFullError(box[0]) from failed.error
    if failed.error is not None:
        raise failed.error
    first = next(r for r, g in enumerate(gathered) if g is not None)
    raise CheckpointError(f"saving {tmp} failed on rank {first} ({gathered[first][1]})")


def _disk_full_message(root: str, tmp: str, where: str, code: int, filename: str | None) -> str:
    steps = complete_steps(root)
    need = ""
    if steps:
        last = os.path.join(root, STEP_DIR.format(steps[-1]))
        manifest = read_manifest(last)
        if isinstance(manifest, dict):
            need = f"a checkpoint needs about {manifest['total_bytes'] / 2**20:.1f} MiB, as {os.path.basename(last)}; "
    try:
        st = os.statvfs(root)
        free = f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    kept = f"{os.path.basename(tmp)} removed, earlier checkpoints untouched"
    return f"{_SPACE_ERRNOS[code]} while writing {filename or where} ({need}{free}; {kept})"


def clean_incomplete(root: str) -> list[str]:
    """Recover from a run killed while saving (rank 0 only): remove ``global_step_*.tmp``
    directories (and ``.deleting`` ones, cut short by a kill during :func:`prune_checkpoints`),
    and put back a ``global_step_<N>.old`` (the previous save of the same step, moved aside by
    :func:`megatron_gad.io.replace_dir`) whose replacement never arrived. Returns the paths removed."""
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if d.startswith("global_step_")]
    stale = [os.path.join(root, d) for d in names if d.endswith((".tmp", ".deleting"))]
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


def _fresh_dir(path: str) -> None:
    remove_dir(path)
    os.makedirs(path)
