"""Faults of multi-day cluster jobs, each injected for real on the demo task's CLI.

Signals are real signals (to the process, to one torchrun worker, SIGKILL to torchrun itself);
damaged checkpoints are real truncated or deleted files; the full disk is a real small tmpfs
(mounted when this process may mount, else a per-process RLIMIT_FSIZE, named as such in the
test id); the lock test runs two real concurrent runs. Each test checks what the user sees (exit
code, the line, the step resumed from) and that no finished work was lost.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ENV, comparable, demo_overrides, pretrain_cli, read_metrics, wait_for

pytestmark = pytest.mark.timeout(900)

MARKER = "latest_checkpointed_iteration.txt"


def overrides(assets, out: str, **extra: object) -> list[str]:
    """The tiny GAD run of the e2e tests, saving every step: 4 prompts a step, 2 responses each, no validation."""
    return demo_overrides(assets, out, True, **{"trainer.save_freq": 1, **extra})


def run_cli(args: list[str], torchrun: int = 0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(pretrain_cli(args, torchrun), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=600, **kw)


def steps_on_disk(out: str) -> list[str]:
    return sorted(d for d in os.listdir(out) if d.startswith("global_step_"))


def logged_steps(out: str) -> int:
    path = os.path.join(out, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@pytest.fixture(scope="module")
def three_steps(assets, tmp_path_factory) -> str:
    """An uninterrupted 3-step run saving every step, keeping 2 checkpoints (verl's spelling)."""
    out = str(tmp_path_factory.mktemp("three") / "run")
    proc = run_cli(overrides(assets, out, **{"trainer.max_actor_ckpt_to_keep": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ------------------------------------------------------------------ integrity: files only, no model
DAMAGE = {
    "truncated shard": ("global_step_3/actor/__0_0.distcp", "truncate"),
    "deleted common.pt": ("global_step_3/actor/common.pt", "delete"),
    "deleted .metadata": ("global_step_3/critic/.metadata", "delete"),
    "deleted RNG state": ("global_step_3/rng_rank0.pt", "delete"),
    "garbled trainer state": ("global_step_3/trainer_state.json", "garble"),
}


def damage(path: str, how: str) -> None:
    if how == "delete":
        os.remove(path)
    elif how == "truncate":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    else:  # same size, not JSON
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(b"{" * size)


@pytest.fixture
def copy_of(three_steps, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(three_steps, out)
    return out


def test_retention_keeps_the_newest_checkpoints(three_steps) -> None:
    """trainer.max_actor_ckpt_to_keep=2 (verl's spelling) over three saves: steps 2 and 3 stay."""
    assert steps_on_disk(three_steps) == ["global_step_2", "global_step_3"]
    assert open(os.path.join(three_steps, MARKER)).read() == "3"
    assert [r["step"] for r in read_metrics(three_steps)] == [1, 2, 3]
    assert not os.path.getsize(os.path.join(three_steps, "run.lock")), "the lock is released at the end"


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_skipped(copy_of, kind: str) -> None:
    from megatron_gad.checkpoint import CheckpointError, resolve_resume

    rel, how = DAMAGE[kind]
    damage(os.path.join(copy_of, rel), how)
    notes: list[str] = []
    assert resolve_resume(copy_of, "auto", notes) == os.path.join(copy_of, "global_step_2")
    assert len(notes) == 1 and os.path.join(copy_of, rel) in notes[0] and "damaged" in notes[0], notes
    with pytest.raises(CheckpointError, match=os.path.basename(rel)):  # an explicit path never falls back
        resolve_resume(copy_of, os.path.join(copy_of, "global_step_3"))


MARKER_FAULTS = {"missing": None, "empty": b"", "not a number": b"step three", "not UTF-8": b"\xff\xfe3",
                 "names a deleted directory": b"9"}


@pytest.mark.parametrize("fault", list(MARKER_FAULTS))
def test_a_bad_latest_marker_scans_the_step_directories(copy_of, fault: str) -> None:
    from megatron_gad.checkpoint import resolve_resume

    marker = os.path.join(copy_of, MARKER)
    os.remove(marker)
    if MARKER_FAULTS[fault] is not None:
        open(marker, "wb").write(MARKER_FAULTS[fault])
    notes: list[str] = []
    assert resolve_resume(copy_of, "auto", notes) == os.path.join(copy_of, "global_step_3")
    assert len(notes) == 1 and marker in notes[0] and "scanning global_step_*" in notes[0], notes
    if fault == "not UTF-8":
        assert "byte 0xff at offset 0" in notes[0]


def test_newest_directory_and_marker_deleted_resume_from_the_older_one(copy_of) -> None:
    from megatron_gad.checkpoint import resolve_resume

    shutil.rmtree(os.path.join(copy_of, "global_step_3"))
    os.remove(os.path.join(copy_of, MARKER))
    assert resolve_resume(copy_of, "auto") == os.path.join(copy_of, "global_step_2")


def test_no_intact_checkpoint_is_an_error_not_a_restart(copy_of) -> None:
    from megatron_gad.checkpoint import CheckpointError, resolve_resume

    for step in ("global_step_2", "global_step_3"):
        os.remove(os.path.join(copy_of, step, "actor", "common.pt"))
    with pytest.raises(CheckpointError, match="no intact checkpoint.*resume_mode=disable"):
        resolve_resume(copy_of, "auto")
    assert resolve_resume(copy_of, "disable") is None


def test_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path) -> None:
    from megatron_gad.runtime.preemption import RunLock, RunLockedError

    root = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from megatron_gad.runtime.preemption import "
                               "RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "sys.stdin.read()", root], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by another run \\(host=.* pid={holder.pid};"):
            RunLock(root).acquire()
    finally:
        holder.kill()  # dies holding the lock: the kernel releases the flock, the file still names it
        holder.wait()
    lock = RunLock(root)
    warning = lock.acquire()
    assert warning is not None and "stale lock" in warning and f"pid={holder.pid}" in warning
    lock.release()
    assert RunLock(root).acquire() is None  # released cleanly: nothing stale


def test_non_utf8_parquet_string_names_file_row_and_column(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_gad.data.dataset import DataError, read_parquet_rows

    raw = pa.array([b"fine", b"also fine", b"bad \xff"], type=pa.binary())
    content = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # invalid UTF-8 in a string column
    messages = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()), pa.StructArray.from_arrays(
        [pa.array(["user"] * 3), content], names=["role", "content"]))
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"prompt": messages, "teacher_response": content}), path)
    with pytest.raises(DataError, match=f"^{path} row 2 column 'prompt': not valid UTF-8 text \\(byte 0xff at"):
        read_parquet_rows(path)


# ------------------------------------------------------------------ end to end: the CLI under faults
def _start(args: list[str], torchrun: int = 0) -> subprocess.Popen:
    return subprocess.Popen(pretrain_cli(args, torchrun), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _workers(proc: subprocess.Popen, n: int) -> list:
    import psutil

    deadline = time.monotonic() + 120
    while True:
        found = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if any("pretrain_gad.py" in part for part in p.cmdline())]
        if len(found) == n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_saves_the_step_in_flight_and_the_resumed_run_matches(assets, tmp_path, three_steps) -> None:
    out = str(tmp_path / "run")
    args = overrides(assets, out, **{"trainer.save_freq": -1})
    proc = _start(args)
    wait_for(proc, lambda: logged_steps(out) >= 1, "step 1")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    stopped = logged_steps(out)
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM" in err
    assert steps_on_disk(out) == [f"global_step_{stopped}"] and open(os.path.join(out, MARKER)).read() == str(stopped)
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/global_step_{stopped} at step {stopped}" in resumed.stdout
    assert comparable(read_metrics(out)) == comparable(read_metrics(three_steps))


@pytest.mark.slow
def test_sigusr1_to_one_torchrun_worker_stops_every_rank_with_a_checkpoint(assets, tmp_path) -> None:
    out = str(tmp_path / "run")
    proc = _start(overrides(assets, out, **{"trainer.save_freq": -1, "trainer.save_on_signal": "[SIGTERM,SIGUSR1]"}),
                  torchrun=2)
    workers = _workers(proc, 2)
    assert len(workers) == 2
    wait_for(proc, lambda: logged_steps(out) >= 1, "step 1")
    sent = time.monotonic()
    os.kill(workers[-1].pid, signal.SIGUSR1)
    out_text, err = proc.communicate(timeout=300)
    took = time.monotonic() - sent
    stopped = logged_steps(out)
    assert proc.returncode == 0, err[-3000:]
    assert f"stopping after step {stopped} (SIGUSR1): saved {out}/global_step_{stopped}" in out_text + err
    assert steps_on_disk(out) == [f"global_step_{stopped}"]
    print(f"SIGUSR1 to exit: {took:.1f} s (wall, loaded machine)")


@pytest.mark.slow
def test_workers_of_a_killed_torchrun_stop_instead_of_running_on(assets, tmp_path) -> None:
    import psutil

    out = str(tmp_path / "run")
    proc = _start(overrides(assets, out, **{"trainer.total_training_steps": 6, "trainer.save_freq": -1}), torchrun=2)
    workers = _workers(proc, 2)
    assert len(workers) == 2
    wait_for(proc, lambda: logged_steps(out) >= 1, "step 1")
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=120)
    for p in alive:
        p.kill()
    assert not alive, "workers outlived their launcher by 120 s"
    # they stopped at a step boundary with a complete checkpoint of it (or died): nothing half-written
    assert not [d for d in steps_on_disk(out) if not d[len("global_step_"):].isdigit()]
    stopped = logged_steps(out)
    assert steps_on_disk(out) in ([], [f"global_step_{stopped}"]) and stopped < 6


@pytest.mark.slow
def test_a_truncated_shard_resumes_from_the_previous_checkpoint(assets, copy_of, three_steps) -> None:
    shard = os.path.join(copy_of, "global_step_3", "actor", "__0_0.distcp")
    damage(shard, "truncate")
    proc = run_cli(overrides(assets, copy_of, **{"trainer.max_actor_ckpt_to_keep": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if shard in line]
    assert len(lines) == 1 and "is damaged" in lines[0] and "bytes, the manifest records" in lines[0]
    assert f"resumed from {copy_of}/global_step_2 at step 2" in proc.stdout
    assert comparable(read_metrics(copy_of)) == comparable(read_metrics(three_steps))
    assert steps_on_disk(copy_of) == ["global_step_2", "global_step_3"]


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["rng_rank0.pt", "trainer_state.json"])
def test_missing_rng_or_trainer_state_fails_before_any_model_is_built(assets, copy_of, missing: str) -> None:
    path = os.path.join(copy_of, "global_step_3")
    os.remove(os.path.join(path, missing))
    proc = run_cli(overrides(assets, copy_of, **{"trainer.resume_mode": path}))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: trainer.resume_mode={path!r} is not a complete "
                                                    f"checkpoint: {os.path.join(path, missing)} is missing")
    assert "actor weights" not in proc.stdout  # printed once the models are built


def _can_mount_tmpfs() -> bool:
    if os.environ.get("MGAD_TEST_SMALL_FS") == "rlimit" or os.geteuid() != 0:
        return False
    probe = f"/tmp/mgad_mount_probe_{os.getpid()}"
    os.makedirs(probe, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", probe], check=True)
    os.rmdir(probe)
    return ok


SMALL_FS = "tmpfs" if _can_mount_tmpfs() else "RLIMIT_FSIZE"


def _file_size_limit(limit: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("small_fs", [SMALL_FS])
def test_a_full_disk_names_itself_keeps_the_last_checkpoint_and_resume_works(assets, tmp_path, three_steps,
                                                                             small_fs: str) -> None:
    """A 16 MiB tmpfs holds one checkpoint (10.4 MiB) but not two; without mount rights, a 1 MiB
    per-process file-size limit on the second run plays the full disk."""
    mnt = str(tmp_path / "fs")
    os.makedirs(mnt)
    out = os.path.join(mnt, "run")
    if small_fs == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt], check=True)
    try:
        if small_fs == "tmpfs":
            full = run_cli(overrides(assets, out))
            cause = "no space left on device"
        else:
            assert run_cli(overrides(assets, out, **{"trainer.total_training_steps": 1})).returncode == 0
            full = run_cli(overrides(assets, out), preexec_fn=_file_size_limit(2**20))
            cause = "file size limit exceeded"
        assert full.returncode == 2, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {cause} while writing {out}/global_step_2.tmp/"), last
        assert "global_step_2.tmp removed, earlier checkpoints untouched" in last
        assert steps_on_disk(out) == ["global_step_1"] and open(os.path.join(out, MARKER)).read() == "1"
        if small_fs == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
        resumed = run_cli(overrides(assets, out))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {out}/global_step_1 at step 1" in resumed.stdout
        assert comparable(read_metrics(out)) == comparable(read_metrics(three_steps))
    finally:
        if small_fs == "tmpfs":
            subprocess.run(["umount", mnt], check=True)


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused(assets, tmp_path, three_steps) -> None:
    out = str(tmp_path / "run")
    first = _start(overrides(assets, out))
    lock = os.path.join(out, "run.lock")
    wait_for(first, lambda: os.path.exists(lock) and os.path.getsize(lock) > 0, "the lock")
    # Freeze the holder while the second run starts: on an idle machine the first run's 3 steps
    # can end before the second has imported its way to the lock.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first run ended before it could be held"
        second = run_cli(overrides(assets, out))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: trainer.default_local_dir={out!r} is in use by another run (host={os.uname().nodename} "
        f"pid={first.pid}; lock file {lock})")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert comparable(read_metrics(out)) == comparable(read_metrics(three_steps))  # the first run lost nothing
