"""What makes a training checkpoint intact: the ``global_step_<N>`` directories, the manifest of
every file's size written last into each save, and the check against it.

:func:`checkpoint_problem` runs before any model is built (local file-system reads, on rank 0 at
resume: :func:`megatron_gad.checkpoint.resolve_resume`); :func:`write_manifest` is a save's last
phase before the directory is published (:func:`megatron_gad.checkpoint.save_training_checkpoint`).
Sizes, not checksums: a killed writer, a full disk or a stray ``rm`` leaves a file missing or short.
"""

from __future__ import annotations

import os
import re

import torch

from megatron_gad.io import write_text_fsynced

MANIFEST_FILE = "manifest.json"
STEP_DIR = "global_step_{}"
_STEP_RE = re.compile(r"global_step_(\d+)")


def complete_steps(root: str) -> list[int]:
    """The steps of the published ``global_step_<N>`` directories in ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    found = (_STEP_RE.fullmatch(d) for d in os.listdir(root))
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(root, m.group(0))))


def saved_world_size(path: str) -> int | None:
    """The world size a checkpoint was saved with (None: no readable manifest)."""
    manifest = read_manifest(path)
    return None if isinstance(manifest, str) or manifest is None else int(manifest["world_size"])


def checkpoint_problem(path: str) -> str | None:
    """What is wrong with the checkpoint directory ``path``, naming the file; None when intact.

    Every file the manifest lists must exist with its recorded size (a killed writer, a full disk
    or a stray ``rm`` leaves a file missing or short), ``trainer_state.json`` must parse and every
    rank's RNG state must load. A directory without a manifest (saved before manifests existed)
    must hold a parsable ``trainer_state.json`` and an ``actor/.metadata``.
    """
    import json

    if not os.path.isdir(path):
        return f"{path} does not exist"
    manifest = read_manifest(path)
    if isinstance(manifest, str):
        return manifest
    if manifest is None:
        required = ["trainer_state.json", os.path.join("actor", ".metadata")]
    else:
        for rel, size in manifest["files"].items():
            file = os.path.join(path, rel)
            if not os.path.isfile(file):
                return f"{file} is missing"
            actual = os.path.getsize(file)
            if actual != size:
                return f"{file} has {actual} bytes, the manifest records {size} (truncated or rewritten)"
        required = [f for f in manifest["files"] if f == "trainer_state.json" or f.startswith("rng_rank")]
        if "trainer_state.json" not in required:
            return f"{os.path.join(path, MANIFEST_FILE)} lists no trainer_state.json"
    for rel in required:
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        try:
            if rel == "trainer_state.json":
                with open(file, encoding="utf-8") as f:
                    if not isinstance(json.load(f).get("step"), int):
                        return f"{file} holds no integer 'step'"
            elif rel.startswith("rng_rank"):
                torch.load(file, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure to read it makes the checkpoint unusable
            return f"{file} is unreadable ({type(exc).__name__}: {exc})"
    return None


def read_manifest(path: str) -> dict | str | None:
    """The manifest of ``path`` (dict), None when there is none, or the problem with it (str)."""
    import json

    file = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        int(manifest["world_size"])
        if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
            raise ValueError("'files' is not a map of sizes")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{file} is unreadable ({type(exc).__name__}: {exc})"
    return manifest


def write_manifest(tmp: str, step: int) -> None:
    """Rank 0, last file of a save: every file under the staging directory ``tmp`` with its
    size, the step and the world size, into ``tmp/manifest.json`` (fsynced)."""
    import json

    files = {}
    for folder, _, names in os.walk(tmp):
        for name in names:
            full = os.path.join(folder, name)
            files[os.path.relpath(full, tmp)] = os.path.getsize(full)
    manifest = {"step": step, "world_size": torch.distributed.get_world_size(),
                "total_bytes": sum(files.values()), "files": dict(sorted(files.items()))}
    write_text_fsynced(os.path.join(tmp, MANIFEST_FILE), json.dumps(manifest, indent=1))
