"""Every benchmark under ``benchmarks/`` runs at tiny sizes and ends with its table and its last
line of ``key=value`` figures, so that a change elsewhere cannot leave one broken unnoticed. The
figures themselves are not checked here (speed is shown by the benchmarks, not asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAST_LINE = re.compile(r"^(\S+=-?[\d.]+(e-?\d+)?|\S+=nan)( (\S+=-?[\d.]+(e-?\d+)?|\S+=nan))*$")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(script: str, *args: str) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line.rstrip() for line in proc.stdout.splitlines() if line.strip()]
    assert LAST_LINE.match(lines[-1]), f"{script}: last line {lines[-1]!r} is not key=value figures"
    return lines


def test_weight_sync(tmp_path) -> None:
    lines = _run("weight_sync.py", "--hidden", "256", "--layers", "2", "--bucket-mb", "1", "--repeats", "1")
    assert any(line.startswith("TP=2 x PP=2") for line in lines)
    assert "sync_over_memcpy[TP=1]=" in lines[-1]


def test_convert(tmp_path) -> None:
    lines = _run("convert.py", "--hidden", "128", "--layers", "2", "--vocab", "512", "--repeat", "1",
                 "--workdir", str(tmp_path))
    assert any(line.startswith("hf_to_megatron") for line in lines)
    assert lines[-1].startswith("hf_to_megatron_over_raw_fsync=")


def test_scaling() -> None:
    lines = _run("scaling.py", "--sizes", "16", "32", "48", "64", "--repeats", "1", "--prompt", "8", "--response", "8")
    assert re.match(r"^r2=\S+ tp2=\S+ pp2=\S+ tp2pp2=\S+$", lines[-1])


def test_logits_window() -> None:
    lines = _run("logits_window.py", "--layers", "1", "--hidden", "64", "--vocab", "512", "--rows", "8", "--micro", "4",
                 "--prompt", "6", "--response", "4", "--runs", "1")
    assert re.match(r"^gspo_ratio=\S+ sft_ratio=\S+$", lines[-1])


def test_gad_vs_seqkd(tmp_path) -> None:
    lines = _run("gad_vs_seqkd.py", "--task", "arith", "--seeds", "1", "--steps", "2", "--jobs", "1",
                 "--out", str(tmp_path))
    assert re.match(r"^gad=\S+ seqkd=\S+$", lines[-1])


def test_vs_trl_our_side(tmp_path) -> None:
    """vs_trl.py's own side (the TRL side runs in its own venv, installed on first use, and is not
    run here): one whole process of our GSPO workload, timed per step."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import vs_trl
    finally:
        sys.path.pop(0)
    vs_trl.ensure_demo()
    result = vs_trl.run_side("ours", 2, str(tmp_path), 0)
    assert len(result["steps"]) == 2 and result["process_cpu"] > 0
    assert all(cpu > 0 and wall > 0 for cpu, wall in result["steps"])
