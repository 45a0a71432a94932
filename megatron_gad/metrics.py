"""Run output: one JSON line per step, a console progress bar, TensorBoard / W&B when asked for.

``MetricsLogger(out_dir, loggers, project, run_name)`` is built on every rank and writes only on
global rank 0. ``<out_dir>/metrics.jsonl`` gets exactly one object per :meth:`MetricsLogger.log`
call, ``{"step": N, "<metric name>": value, ...}``, whatever ``loggers`` says (it is the public
record of a run); a resumed run passes ``resume_step`` so lines of steps >= it are dropped first
and no step appears twice. Non-finite values are written as ``null`` (strict JSON).

:class:`Timer` measures named phases (``timing/rollout``, ``timing/critic_update``, ...) in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from megatron_gad.io import atomic_write_text

#: Metrics shown on the progress bar and the console line, in this order, when present.
KEY_METRICS: tuple[str, ...] = (
    "critic/d_loss",
    "critic/d_acc",
    "critic/student_value_mean",
    "critic/teacher_value_mean",
    "critic/vf_loss",
    "actor/pg_loss",
    "actor/pg_clipfrac",
    "actor/entropy",
    "response_length/mean",
    "timing/step",
)

_SHORT_NAMES = {
    "critic/student_value_mean": "student",
    "critic/teacher_value_mean": "teacher",
    "response_length/mean": "resp_len",
    "timing/step": "s/step",
}

#: logger name -> (python module it needs, pip package to install).
_BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class MetricsError(RuntimeError):
    """A metrics sink was requested that cannot work here (its package is not installed)."""


def missing_logger_backends(loggers: Sequence[str]) -> list[str]:
    """One message per requested logger (``trainer.logger``) whose package is not installed."""
    problems = []
    for name in loggers:
        module, package = _BACKENDS.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            problems.append(
                f"trainer.logger includes '{name}' but the '{package}' package is not installed "
                f"(pip install {package}, or remove '{name}' from trainer.logger)"
            )
    return problems


def global_rank() -> int:
    """This process's global rank: torch.distributed when initialised, else $RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _json_value(value: Any) -> Any:
    """Plain JSON scalar of a metric: tensors/numpy scalars -> float; NaN/inf -> None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or isinstance(value, int) or value is None or isinstance(value, str):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def truncate_jsonl(path: str, resume_step: int) -> int:
    """Keep only the lines of ``path`` with ``step < resume_step``; drop torn or unreadable lines.

    Rewrites the file atomically; returns the number of lines kept. A missing file is left absent.
    """
    if not os.path.exists(path):
        return 0
    kept = []
    with open(path, encoding="utf-8") as src:
        for line in src:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < resume_step:
                kept.append(json.dumps(record) + "\n")
    atomic_write_text(path, "".join(kept))
    return len(kept)


def format_metrics(step: int, metrics: Mapping[str, Any], keys: Sequence[str] = KEY_METRICS) -> str:
    """A compact one-line summary of the key metrics present (and every ``val/`` metric)."""
    parts = [f"step {step}"]
    names = [k for k in keys if k in metrics] + sorted(k for k in metrics if k.startswith("val/"))
    for name in names:
        value = _json_value(metrics[name])
        label = _SHORT_NAMES.get(name, name.split("/", 1)[-1])
        parts.append(f"{label}={value:.4g}" if isinstance(value, float) else f"{label}={value}")
    return " | ".join(parts)


class MetricsLogger:
    """Per-step metrics sink of a run (see the module docstring). Build on every rank.

    Args:
        out_dir: ``trainer.default_local_dir``; ``metrics.jsonl`` (and ``tensorboard/``) go here.
        loggers: ``trainer.logger`` names: ``console`` (progress bar + one line per step),
            ``jsonl`` (implied, always on), ``tensorboard``, ``wandb``.
        project, run_name: ``trainer.project_name`` / ``experiment_name`` (W&B project and run).
        total_steps: length of the progress bar (None: open-ended).
        resume_step: first step of a resumed run; lines with ``step >= resume_step`` are removed.
        config: the resolved config as a dict, recorded by W&B.
    """

    def __init__(
        self,
        out_dir: str,
        loggers: Sequence[str],
        project: str,
        run_name: str,
        total_steps: int | None = None,
        resume_step: int = 0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = global_rank() == 0
        self._file = self._bar = self._tb = self._wandb = None
        if not self.enabled:
            return
        problems = missing_logger_backends(loggers)
        if problems:
            raise MetricsError("; ".join(problems))
        os.makedirs(out_dir, exist_ok=True)
        if resume_step > 0:
            truncate_jsonl(self.path, resume_step)
        elif os.path.exists(self.path):
            os.replace(self.path, f"{self.path}.{int(time.time())}.bak")  # a fresh run starts a fresh file
        self._file = open(self.path, "a", encoding="utf-8")
        if "console" in loggers:
            self._bar = _progress_bar(total_steps, resume_step)
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step or None)
        if "wandb" in loggers:
            self._wandb = _start_wandb(out_dir, project, run_name, config)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step: one JSON line (flushed), bar/console, TensorBoard, W&B. Rank 0 only."""
        if not self.enabled:
            return
        record = {"step": int(step), **{str(k): _json_value(v) for k, v in metrics.items()}}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(format_metrics(step, record).split(" | ", 1)[-1], refresh=True)
            self._bar.write(format_metrics(step, record), file=sys.stdout)
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for name, value in numeric.items():
                self._tb.add_scalar(name, value, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        for sink, method in ((self._bar, "close"), (self._tb, "close"), (self._wandb, "finish"), (self._file, "close")):
            if sink is not None:
                getattr(sink, method)()
        self._file = self._bar = self._tb = self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _progress_bar(total: int | None, initial: int) -> Any:
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (a log file gets the per-step lines only)
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                disable=None)


def _start_wandb(out_dir: str, project: str, run_name: str, config: Mapping[str, Any] | None) -> Any:
    """Start (or, with the id stored in ``out_dir``, resume) the W&B run of this run directory."""
    import wandb

    id_file = os.path.join(out_dir, "wandb_run_id.txt")
    if os.path.exists(id_file):
        run_id = open(id_file, encoding="utf-8").read().strip()
    else:
        run_id = wandb.util.generate_id()
        with open(id_file, "w", encoding="utf-8") as out:
            out.write(run_id)
    return wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=out_dir,
                      config=dict(config or {}))


class Timer:
    """Wall-clock seconds per named phase of a step; ``with timer("rollout"): ...``.

    Repeated phases accumulate until :meth:`reset`. With ``cuda_sync`` (default: when CUDA is
    available) the GPU is synchronised at phase boundaries so queued kernels are counted.
    Every rank may use one; report rank 0's.
    """

    def __init__(self, cuda_sync: bool | None = None) -> None:
        import torch

        self._sync = torch.cuda.is_available() if cuda_sync is None else cuda_sync
        self.seconds: dict[str, float] = {}

    def _barrier(self) -> None:
        if self._sync:
            import torch

            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._barrier()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._barrier()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``{"timing/<phase>": seconds}`` for every phase this timer measured (one timer per step)."""
        return {f"timing/{phase}": value for phase, value in self.seconds.items()}


def throughput_metrics(num_tokens: int, seconds: float, world_size: int = 1) -> dict[str, float]:
    """Tokens per second of a step: ``perf/total_num_tokens``, ``perf/tokens_per_s`` (whole job)
    and ``perf/tokens_per_s_per_rank``. ``num_tokens`` counts prompt + response tokens of the step."""
    rate = num_tokens / seconds if seconds > 0 else 0.0
    return {
        "perf/total_num_tokens": float(num_tokens),
        "perf/tokens_per_s": rate,
        "perf/tokens_per_s_per_rank": rate / max(world_size, 1),
    }
