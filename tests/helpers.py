"""What the end-to-end test files share: the demo run's overrides, its command line, its metrics,
and waiting on a running process. (The demo-assets fixture, ``assets``, is in ``conftest.py``.)

Imported as ``tests.helpers`` (pytest.ini's ``pythonpath`` puts the repository on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "examples", "configs")
DEMO_REWARD = os.path.join(REPO, "megatron_gad", "data", "demo.py")
#: The environment of a subprocess run of the package: one thread, this checkout importable.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def demo_overrides(assets: Any, out_dir: str, gad: bool = True, **extra: object) -> list[str]:
    """``dotted.key=value`` overrides of a tiny run on the demo ``assets`` (GAD data, or the
    standard data with the demo reward): 4 prompts a step, 2 responses each, 3 steps, CPU
    rollouts, no warmup, validation, checkpoint or export; ``extra`` adds or replaces keys."""
    base: dict[str, object] = {
        "data.train_files": assets.train_file if gad else assets.train_standard_file,
        "data.val_files": assets.val_file if gad else assets.val_standard_file, "data.train_batch_size": 4,
        "data.max_prompt_length": 32, "data.max_response_length": 24,
        "actor_rollout_ref.model.path": assets.student_dir,
        "actor_rollout_ref.model.tokenizer_path": assets.tokenizer_dir,
        "critic.model.path": assets.discriminator_dir,
        "actor_rollout_ref.rollout.name": "cpu", "actor_rollout_ref.rollout.n": 2,
        "actor_rollout_ref.ppo_mini_batch_size": 4, "actor_rollout_ref.ppo_micro_batch_size_per_gpu": 4,
        "trainer.total_training_steps": 3, "trainer.total_epochs": 1, "trainer.default_local_dir": out_dir,
        "trainer.save_freq": -1, "trainer.test_freq": -1, "trainer.val_before_train": False,
        "trainer.logger": "jsonl", "trainer.generator_warmup_steps": 0, "trainer.critic_warmup": 0,
        "trainer.export_hf": False,
    }
    if not gad:
        base["custom_reward_function.path"] = DEMO_REWARD
        base["custom_reward_function.name"] = "demo_reward"
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def pretrain_cli(args: list[str], torchrun: int = 0, config: str = "gad_gspo.yaml") -> list[str]:
    """The command line of ``examples/pretrain_gad.py --config <config> args...``: one process, or
    under torchrun with ``torchrun`` workers on a free port."""
    script = [os.path.join(REPO, "examples", "pretrain_gad.py"), "--config", os.path.join(CONFIGS, config), *args]
    if torchrun:
        from megatron_gad.runtime.distributed import _free_port

        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                "--master_port", str(_free_port()), *script]
    return [sys.executable, *script]


def read_metrics(out_dir: str) -> list[dict]:
    """The rows of ``<out_dir>/metrics.jsonl``, one per logged step."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock ones (``timing/*``, ``perf/*``), which no two runs share."""
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/"))} for r in rows]


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 600,
             poll_s: float = 0.01) -> None:
    """Poll ``ready()`` every ``poll_s`` seconds until it holds; fail (with the process's stderr
    when it is piped) if ``proc`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            err = proc.communicate()[1]
            raise AssertionError(f"the run ended before {what}" + (f": {err[-3000:]}" if err else ""))
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(poll_s)
