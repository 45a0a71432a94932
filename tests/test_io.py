"""megatron_gad.io: a file replaced atomically, a directory swapped into place."""

from __future__ import annotations

import os

import pytest

from megatron_gad.io import atomic_write_text, replace_dir


def test_atomic_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path) -> None:
    target = tmp_path / "marker.txt"
    atomic_write_text(target, "1")
    atomic_write_text(str(target), "22")
    assert target.read_text() == "22" and os.listdir(tmp_path) == ["marker.txt"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_text(target, None)  # fails while writing, after the temporary file exists
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.yaml"]


def test_replace_dir_swaps_a_complete_directory_in(tmp_path) -> None:
    final, staging = tmp_path / "out", tmp_path / "out.new"
    staging.mkdir()
    (staging / "a").write_text("first")
    replace_dir(staging, final)  # no earlier directory
    assert (final / "a").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["out"]
    staging.mkdir()
    (staging / "b").write_text("second")
    replace_dir(staging, final)  # the earlier one is moved aside, then deleted
    assert os.listdir(final) == ["b"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_replace_dir_keeps_the_old_directory_aside_when_the_last_rename_fails(tmp_path) -> None:
    final, aside = tmp_path / "out", tmp_path / "out.old"
    final.mkdir()
    (final / "a").write_text("old")
    with pytest.raises(OSError):
        replace_dir(tmp_path / "missing", final)
    assert not final.exists() and (aside / "a").read_text() == "old"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name descriptors")
def test_fsync_tree_flushes_every_file_and_directory_contents_first(tmp_path, monkeypatch) -> None:
    from megatron_gad.io import fsync_tree

    (tmp_path / "out" / "sub").mkdir(parents=True)
    for name in ("out/a.json", "out/sub/b.safetensors"):
        (tmp_path / name).write_text("x")
    real, synced = os.fsync, []
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    fsync_tree(tmp_path / "out")
    out = str(tmp_path / "out")
    expected = [f"{out}/a.json", f"{out}/sub/b.safetensors", f"{out}/sub", out]
    assert sorted(synced) == sorted(expected)
    assert synced.index(f"{out}/sub/b.safetensors") < synced.index(f"{out}/sub") < synced.index(out)
