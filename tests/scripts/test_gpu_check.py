"""``scripts/gpu_check.sh --dry-run``: the GPU readiness check's own code, on the CPU with tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.slow
def test_dry_run_prints_every_section_and_writes_json(tmp_path) -> None:
    from megatron_gad.models.hf_mapping import hf_expected_shapes

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=REPO, env=_env(OUT=str(out)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.txt").read_text().strip() in proc.stdout
    assert report["dry_run"] is True and report["env"]["device"] == "cpu"

    tests = report["tests"]
    assert tests["ok"] and not tests["failed"]
    # on the CPU every gpu-marked test is skipped, each with its reason
    assert tests["skipped"] and all(s["reason"] for s in tests["skipped"]) and not tests["passed"]

    assert [r["seq"] for r in report["train"]] == [16, 32]
    for row in report["train"]:
        assert row["tokens"] == row["rows"] * row["seq"] and row["tokens_per_s"] > 0 and row["mfu"] is None
        assert 0 < row["loss"] < 20 and row["dtype"] == "float32"

    hf = gpu_check.llama_config(dry_run=True)
    want = sum(2 * _numel(s) for s in hf_expected_shapes(hf).values())  # bf16 bytes of the HF tensors
    export = report["export"]
    assert export["bytes"] == want and export["tensors"] == len(hf_expected_shapes(hf))
    assert export["copy_s"] > 0 and export["export_load_s"] > 0

    demo = report["demo"]
    assert demo["rc"] == 0 and demo["steps"] == 3 and demo["gad_steps_timed"] == 1
    for phase in ("weight_sync", "rollout", "old_log_prob", "score", "critic_update", "actor_update", "step"):
        assert phase in demo["phases"], phase
    for section in ("tests", "train", "demo", "export"):
        assert f"\n{section}" in proc.stdout, section


def test_missing_wheels_is_one_clear_error(tmp_path) -> None:
    proc = subprocess.run(["bash", SCRIPT, "--wheels", str(tmp_path / "none")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"[gpu_check] error: no megatron_gad wheel in {tmp_path / 'none'} "
        f"(run scripts/gpu_check.sh --prepare {tmp_path / 'none'} first)"
    ]


def test_flop_count_matches_the_model_built() -> None:
    """``matmul_params`` (the MFU numerator's N) counts the parameters of the linear layers."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    hf = gpu_check.llama_config(dry_run=True)
    model = AutoModelForCausalLM.from_config(hf)
    linear = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Linear")
    assert gpu_check.matmul_params(hf) == linear
    big = gpu_check.llama_config(dry_run=False)
    total = gpu_check.matmul_params(big) + big.vocab_size * big.hidden_size + big.hidden_size * (
        2 * big.num_hidden_layers + 1)
    assert 0.45e9 < total < 0.55e9  # "~0.5B parameters"


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
