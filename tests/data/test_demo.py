"""Demo asset tests: byte-for-byte determinism, atomic generation, task content, reward, CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from megatron_gad.data import demo as demo_mod
from megatron_gad.data.demo import DemoAssets, demo_reward, ensure_demo_assets, generate_demo_assets

REPO = Path(__file__).resolve().parents[2]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seed1(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return generate_demo_assets(tmp_path_factory.mktemp("seed1") / "demo", seed=1)


@pytest.fixture(scope="module")
def tok(seed1: DemoAssets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(seed1.student_dir))


def test_same_seed_same_bytes_other_seed_differs(seed1, tmp_path):
    again = generate_demo_assets(tmp_path / "again", seed=1)
    a, b = tree_bytes(seed1.root), tree_bytes(again.root)
    assert sorted(a) == sorted(b) and a == b
    other = tree_bytes(generate_demo_assets(tmp_path / "other", seed=2).root)
    for name in ("train.parquet", "val.parquet", "train_standard.parquet", "manifest.json"):
        assert other[name] != a[name]


def test_task_content(seed1, tok):
    train = pq.read_table(seed1.train_file).to_pylist()
    val = pq.read_table(seed1.val_file).to_pylist()
    assert len(train) == 2000 and len(val) == 200
    pairs = lambda rows: {(r["extra_info"]["a"], r["extra_info"]["b"]) for r in rows}  # noqa: E731
    assert not pairs(train) & pairs(val) and len(pairs(train)) == 2000
    p_lens, r_lens = [], []
    for r in train + val:
        a, b = r["extra_info"]["a"], r["extra_info"]["b"]
        assert r["teacher_response"] == f"{a} + {b} = {a + b}. The answer is {a + b}."
        assert r["reward_model"]["ground_truth"] == str(a + b) and r["data_source"] == "demo_arith"
        assert demo_reward(r["data_source"], r["teacher_response"], r["reward_model"]["ground_truth"]) == 1.0
        ids = tok.encode(r["teacher_response"], add_special_tokens=False)
        assert tok.decode(ids) == r["teacher_response"] and tok.unk_token_id not in ids
        p_lens.append(len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)))
        r_lens.append(len(ids) + 1)
    assert max(p_lens) <= 24 and max(r_lens) <= 24
    std = pq.read_table(seed1.train_standard_file)
    assert "teacher_response" not in std.column_names
    assert std.column("prompt").to_pylist() == [r["prompt"] for r in train]


def test_tokenizer_and_model_configs(seed1, tok):
    from transformers import AutoConfig

    assert tok.pad_token and tok.eos_token and tok.bos_token and tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>What is 1 + 2?<|assistant|>"
    manifest = json.loads((seed1.root / "manifest.json").read_text())
    assert manifest["vocab_size"] == len(tok)
    for d in (seed1.student_dir, seed1.discriminator_dir):
        c = AutoConfig.from_pretrained(str(d))
        assert c.model_type == "llama" and c.vocab_size == len(tok) and c.tie_word_embeddings
        assert c.eos_token_id == tok.eos_token_id and c.pad_token_id == tok.pad_token_id
    assert AutoConfig.from_pretrained(str(seed1.discriminator_dir)).num_labels == 1


def test_models_are_seeded_and_the_discriminator_starts_from_the_student(seed1, tmp_path):
    """The student loads in transformers; the discriminator holds the student's trunk plus a
    zero scalar head; the weights are a function of the seed."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    student = load_file(str(seed1.student_dir / "model.safetensors"))
    disc = load_file(str(seed1.discriminator_dir / "model.safetensors"))
    assert set(disc) == set(student) | {"score.weight"} and "lm_head.weight" not in student
    assert all(torch.equal(disc[k], v) for k, v in student.items())
    assert disc["score.weight"].shape == (1, 128) and not disc["score.weight"].any()  # zero head
    AutoModelForCausalLM.from_pretrained(str(seed1.student_dir))
    other = ensure_demo_assets(tmp_path / "seed2", seed=2)
    again = ensure_demo_assets(tmp_path / "seed1", seed=1)
    assert (again.student_dir / "model.safetensors").read_bytes() == (seed1.student_dir / "model.safetensors").read_bytes()
    assert (other.student_dir / "model.safetensors").read_bytes() != (seed1.student_dir / "model.safetensors").read_bytes()


def test_demo_reward():
    assert demo_reward("demo_arith", "37 + 45 = 82. The answer is 82.", "82") == 1.0
    assert demo_reward("demo_arith", "The answer is 81. The answer is 82.", "82") == 1.0
    assert demo_reward("demo_arith", "37 + 45 = 82. The answer is 83.", "82") == 0.0
    assert demo_reward("demo_arith", "37 + 45 = 82.", "82") == 0.0
    assert demo_reward("demo_arith", "The answer is 820.", "82") == 0.0
    assert demo_reward("x", "The answer is 82", 82, extra_info={"a": 1}) == 1.0
    assert demo_reward("demo_arith", "", "82") == 0.0 and demo_reward("demo_arith", "The answer is 1.", None) == 0.0


def test_ensure_generates_once_force_and_seed(tmp_path):
    out = tmp_path / "assets"
    first = ensure_demo_assets(out)
    stamp = first.train_file.stat().st_mtime_ns
    assert ensure_demo_assets(out).train_file.stat().st_mtime_ns == stamp
    assert ensure_demo_assets(out, seed=1).train_file.stat().st_mtime_ns == stamp
    before = first.train_file.read_bytes()
    ensure_demo_assets(out, seed=3)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3 and first.train_file.read_bytes() != before
    ensure_demo_assets(out, seed=1, force=True)
    assert first.train_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]  # no temp dirs left behind


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_mod, "write_models", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_assets(tmp_path / "assets")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a demo asset directory"):
        ensure_demo_assets(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "examples/data/make_demo_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--out", str(tmp_path / "d"), "--seed", "4"]) == 0
    assert "seed 4" in capsys.readouterr().out
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    assert cli.main(["--out", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err


def test_styles_task(tmp_path):
    """The styles task: same prompts as the addition task, each teacher answer one complete style
    drawn at random (all three used), which its checker accepts as valid and correct; the
    addition set is not reused for it and vice versa."""
    from transformers import AutoTokenizer

    from megatron_gad.data.demo import STYLES, check_response

    out = tmp_path / "styles"
    styles = ensure_demo_assets(out, task="styles")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "styles" and manifest["data_source"] == "demo_styles"
    tok = AutoTokenizer.from_pretrained(str(styles.tokenizer_dir))
    rows = pq.read_table(styles.train_file).to_pylist() + pq.read_table(styles.val_file).to_pylist()
    used = set()
    for r in rows:
        a, b = r["extra_info"]["a"], r["extra_info"]["b"]
        assert r["data_source"] == "demo_styles" and check_response("demo_styles", r["teacher_response"], a, b) == (True, True, True)
        used |= {k for k, s in enumerate(STYLES) if r["teacher_response"] == s.format(a=a, b=b, s=a + b)}
        ids = tok.encode(r["teacher_response"], add_special_tokens=False)
        assert tok.decode(ids) == r["teacher_response"] and tok.unk_token_id not in ids and len(ids) + 1 <= 24
    assert used == {0, 1, 2}
    stamp = styles.train_file.stat().st_mtime_ns
    assert ensure_demo_assets(out, task="styles").train_file.stat().st_mtime_ns == stamp
    ensure_demo_assets(out)  # an addition set is asked for: regenerated
    assert "task" not in json.loads((out / "manifest.json").read_text())
    with pytest.raises(ValueError, match="unknown demo task"):
        generate_demo_assets(tmp_path / "bad", task="poems")


def test_checker():
    from megatron_gad.data.demo import check_response

    s = "demo_styles"
    assert check_response(s, "45 + 3 = 48. The answer is 48.", 45, 3) == (True, True, True)
    assert check_response(s, "The sum of 45 and 3 is 9.", 45, 3) == (True, True, False)  # valid, wrong sum
    assert check_response(s, "The answer is 26, since 45 plus 3 is 26.", 45, 3) == (True, True, False)
    assert check_response(s, "The answer is 48, since 45 plus 3 is 47.", 45, 3) == (True, False, False)  # two sums
    assert check_response(s, "The answer is 48, since 44 plus 3 is 48.", 45, 3) == (True, False, False)  # operand
    assert check_response(s, "The answer is 48.", 45, 3) == (False, False, False)  # blend of styles 2 and 0
    assert check_response(s, "The sum of 45 and 3 is 48, since 45 plus 3 is 48.", 45, 3) == (False, False, False)
    assert check_response(s, "The sum of 45 and 3 is 48. x", 45, 3) == (False, False, False)  # trailing text
    assert check_response(s, "  The sum of 45  and 3 is 48. ", 45, 3) == (True, True, True)  # whitespace
    assert check_response("demo_arith", "The sum of 45 and 3 is 48.", 45, 3) == (False, False, False)  # one style
    assert check_response("demo_arith", "45 + 3 = 48. The answer is 48.", 45, 3) == (True, True, True)
    assert check_response("other", "45 + 3 = 48. The answer is 48.", 45, 3) is None
