"""MetricsLogger (metrics.jsonl, console, resume truncation, rank 0 only) and Timer."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

from megatron_gad.metrics import MetricsError, MetricsLogger, Timer, throughput_metrics, truncate_jsonl


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _metrics(step: int) -> dict:
    return {"critic/d_loss": 0.7 - 0.01 * step, "critic/d_acc": torch.tensor(0.5 + 0.01 * step),
            "actor/pg_loss": float("nan") if step == 2 else -0.1, "response_length/mean": 12}


@pytest.fixture(autouse=True)
def _rank0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)


def test_one_json_line_per_step_with_design_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with MetricsLogger(str(tmp_path), ["console", "jsonl"], "proj", "run", total_steps=4) as logger:
        for step in range(4):
            logger.log(step, _metrics(step))
            assert len(_lines(tmp_path / "metrics.jsonl")) == step + 1  # flushed every step
    records = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[1]["critic/d_acc"] == pytest.approx(0.51) and records[1]["response_length/mean"] == 12
    assert records[2]["actor/pg_loss"] is None  # non-finite -> null, the file stays strict JSON
    assert all(isinstance(r["critic/d_loss"], float) and math.isfinite(r["critic/d_loss"]) for r in records)
    out = capsys.readouterr().out
    assert "step 3 | d_loss=0.67 | d_acc=0.53 | pg_loss=-0.1 | resp_len=12" in out


def test_resume_truncates_to_steps_before_resume(tmp_path: Path) -> None:
    with MetricsLogger(str(tmp_path), ["jsonl"], "p", "r") as logger:
        for step in range(6):
            logger.log(step, _metrics(step))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "critic/d_lo')  # torn by a kill mid-write
    with MetricsLogger(str(tmp_path), ["jsonl"], "p", "r", resume_step=3) as logger:
        assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1, 2]
        for step in range(3, 5):
            logger.log(step, _metrics(step))
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_fresh_run_moves_an_old_file_aside(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "x": 1}\n')
    with MetricsLogger(str(tmp_path), ["jsonl"], "p", "r") as logger:
        logger.log(0, {"y": 2.0})
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 0, "y": 2.0}]
    assert len(list(tmp_path.glob("metrics.jsonl.*.bak"))) == 1


def test_truncate_missing_file_is_a_no_op(tmp_path: Path) -> None:
    assert truncate_jsonl(str(tmp_path / "metrics.jsonl"), 5) == 0
    assert not (tmp_path / "metrics.jsonl").exists()


def test_only_rank0_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    with MetricsLogger(str(tmp_path / "out"), ["console", "jsonl", "tensorboard"], "p", "r") as logger:
        logger.log(0, {"a": 1.0})
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_requested_but_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match="'tensorboard' package is not installed .*pip install tensorboard"):
        MetricsLogger(str(tmp_path), ["console", "tensorboard"], "p", "r")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_events_written(tmp_path: Path) -> None:
    with MetricsLogger(str(tmp_path), ["tensorboard"], "p", "r") as logger:
        logger.log(0, {"critic/d_loss": 0.6})
    assert list((tmp_path / "tensorboard").glob("events.*"))


def test_timer_accumulates_phases_and_throughput() -> None:
    timer = Timer(cuda_sync=False)
    with timer("rollout"):
        time.sleep(0.02)
    with timer("critic_update"):
        pass
    with timer("rollout"):
        time.sleep(0.01)
    got = timer.metrics()
    assert set(got) == {"timing/rollout", "timing/critic_update"}
    assert 0.03 <= got["timing/rollout"] < 1.0 and got["timing/critic_update"] < got["timing/rollout"]
    perf = throughput_metrics(1000, 2.0, world_size=4)
    assert perf == {"perf/total_num_tokens": 1000.0, "perf/tokens_per_s": 500.0, "perf/tokens_per_s_per_rank": 125.0}
