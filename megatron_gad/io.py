"""Crash-safe file system writes: a file replaced atomically, a directory swapped into place.

A run can be killed at any moment (torchrun stopping a failed job, a pre-empted node). Every
file or directory the project publishes (a checkpoint, its marker, an export, the resolved
config, the demo assets, a rewritten ``metrics.jsonl``) is written beside its final path first
and renamed over it at the end, so a reader sees either the old version or the new one.
"""

from __future__ import annotations

import os
import shutil


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling that is flushed to disk and
    then renamed over ``path``; the temporary file is removed when the write fails."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Delete the directory tree at ``path`` if there is one."""
    if os.path.isdir(path):
        shutil.rmtree(path)


def replace_dir(staging: str | os.PathLike[str], final: str | os.PathLike[str],
                aside: str | os.PathLike[str] | None = None) -> None:
    """Rename the complete directory ``staging`` to ``final``.

    An existing ``final`` is renamed to ``aside`` (default ``<final>.old``) first and deleted
    last, so a kill at any moment leaves a complete directory on disk: ``final``, or ``aside``
    while ``final`` is missing (a caller that resumes can rename it back). Raises OSError when the
    last rename fails (``aside`` is then kept).
    """
    final = os.fspath(final)
    aside = os.fspath(aside) if aside is not None else f"{final}.old"
    if os.path.exists(final):
        remove_dir(aside)
        os.replace(final, aside)
    os.replace(staging, final)
    remove_dir(aside)


def write_text_fsynced(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` in place and fsync it: for a file inside a staging
    directory that is renamed into place later (no rename of its own needed)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush the file or directory ``path`` to disk (a directory: its entries, so a rename or a
    new file in it survives a crash)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """:func:`fsync_path` every file and directory under ``root`` (``root`` included), the
    directories after their contents: what a directory about to be renamed into place needs. A
    file already on disk costs one cheap ``fsync``."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


__all__ = ["atomic_write_text", "fsync_path", "fsync_tree", "remove_dir", "replace_dir", "write_text_fsynced"]
