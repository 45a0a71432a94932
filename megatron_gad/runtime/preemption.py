"""Run-level fault handling: one run per directory, save-and-stop on a signal, launcher death.

* :class:`RunLock`: an ``flock`` on ``<default_local_dir>/run.lock`` holding the owner's host and
  PID. A second run on the same directory is refused in one line naming the holder; a lock left
  by a process that is gone (the kernel released its flock) is taken over with a warning.
* :class:`StopOnSignal`: SIGTERM (and any other configured signal, e.g. SLURM's ``--signal``
  SIGUSR1) only sets a flag; at each step boundary every rank agrees (one all-reduce) whether
  any of them got one, and then they all save and stop together.
* Under torchrun, :func:`stop_with_launcher` asks the kernel to send SIGTERM to a worker whose
  launcher dies (``PR_SET_PDEATHSIG``), and :class:`StopOnSignal` also stops when the parent
  process changed: no worker keeps training, or writing checkpoints, as an orphan.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist

from megatron_gad.checkpoint import CheckpointError

LOCK_FILE = "run.lock"

_LAUNCHER_GONE = 1000  # a stop code beyond every signal number


class RunLockedError(CheckpointError):
    """Another live run holds the lock on the run directory."""


class RunLock:
    """An exclusive ``flock`` on ``<root>/run.lock`` for the lifetime of the run (rank 0)."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; return a warning line when a stale lock was taken over. Raises
        RunLockedError naming the holder when another live process holds it."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(f"trainer.default_local_dir={os.path.dirname(self.path)!r} is in use by "
                                 f"another run ({holder or 'holder unknown'}; lock file {self.path})") from None
        except OSError as exc:
            os.close(fd)
            raise CheckpointError(f"cannot lock {self.path} ({exc.strerror}): the file system of "
                                  f"trainer.default_local_dir must support flock (Lustre: mount with -o flock)") from None
        stale = _read_holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if stale:
            return f"took over the stale lock {self.path} of a run that is gone ({stale})"
        return None

    def release(self) -> None:
        """Empty the lock file and unlock it (also done by the kernel when the process dies)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def stop_with_launcher() -> None:
    """Under torchrun: have the kernel send this worker SIGTERM when its launcher dies (Linux).
    torchrun starts workers in a session of their own, so nothing else reaches them."""
    if not launched_by_torchrun() or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


class StopOnSignal:
    """Turns the configured signals into a request to stop at the next step boundary.

    Install on every rank at the start of training; :meth:`agreed` is collective (call it at the
    same point of every step on every rank); :meth:`restore` puts the previous handlers back.
    """

    def __init__(self, names: list[str]) -> None:
        self.code = 0
        self._previous: dict[int, object] = {}
        self._parent = os.getppid()
        for name in names:
            signum = int(getattr(signal, name))
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.code:
            print(f"[megatron_gad] rank {dist.get_rank() if dist.is_initialized() else 0} received "
                  f"{signal.Signals(signum).name}: saving a checkpoint after the step in flight, then stopping",
                  file=sys.stderr, flush=True)
        self.code = max(self.code, signum)

    def agreed(self) -> str | None:
        """Collective: why the run stops now (``SIGTERM``, ``the launcher died``) when any rank got
        a stop signal, else None."""
        from megatron_gad.runtime.distributed import device

        code = self.code
        if launched_by_torchrun() and os.getppid() != self._parent:
            code = _LAUNCHER_GONE
        flag = torch.tensor([float(code)], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag[0])
        if not code:
            return None
        return "the launcher died" if code == _LAUNCHER_GONE else signal.Signals(code).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
