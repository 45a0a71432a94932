"""Dataset tests: tokenized rows against a direct construction, padding, truncation, modes."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megatron_gad.data import (
    DataConfig,
    DataError,
    Mode,
    PromptDataset,
    build_loaders,
    ensure_demo_assets,
)
from megatron_gad.data.dataset import check_messages

P, R = 24, 24


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """Demo assets generated once for this module's tests."""
    return ensure_demo_assets(tmp_path_factory.mktemp("demo_for_dataset") / "demo")


@pytest.fixture(scope="session")
def tok(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo.tokenizer_dir))


def cfg(files: Any, **kw: Any) -> DataConfig:
    base = dict(max_prompt_length=P, max_response_length=R, train_batch_size=4)
    base.update(kw)
    return DataConfig(train_files=files, **base)


def write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> str:
    table = pa.Table.from_pylist(rows, schema=schema) if rows or schema else pa.table({})
    pq.write_table(table, path)
    return str(path)


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def manual_positions(mask: list[int]) -> list[int]:
    out, pos = [], -1
    for m in mask:
        pos += m
        out.append(max(pos, 0))
    return out


# ----------------------------------------------------------------------------- row fields


def test_every_field_matches_direct_construction(demo, tok):
    ds = PromptDataset([str(demo.train_file)], tok, cfg(str(demo.train_file)))
    assert ds.mode is Mode.GAD and len(ds) == 2000
    rows = pq.read_table(demo.train_file).to_pylist()
    picks = [0, 7, 1999]
    batch = ds.batch(picks)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for b, i in enumerate(picks):
        row = rows[i]
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        resp = tok.encode(row["teacher_response"], add_special_tokens=False) + [eos]
        assert len(prompt) <= P and len(resp) <= R
        p_mask = [0] * (P - len(prompt)) + [1] * len(prompt)
        r_mask = [1] * len(resp) + [0] * (R - len(resp))
        assert batch.input_ids[b].tolist() == [pad] * (P - len(prompt)) + prompt
        assert batch.attention_mask[b].tolist() == p_mask
        assert batch.position_ids[b].tolist() == manual_positions(p_mask)
        assert batch.teacher_response_ids[b].tolist() == resp + [pad] * (R - len(resp))
        assert batch.teacher_response_mask[b].tolist() == r_mask
        assert batch.teacher_input_ids[b].tolist() == batch.input_ids[b].tolist() + batch.teacher_response_ids[b].tolist()
        assert batch.teacher_attention_mask[b].tolist() == p_mask + r_mask
        assert batch.teacher_position_ids[b].tolist() == manual_positions(p_mask + r_mask)
        assert batch.teacher_response[b] == row["teacher_response"]
        assert batch.raw_prompt[b] == row["prompt"]
        assert batch.ground_truth[b] == row["reward_model"]["ground_truth"]
        assert batch.data_source[b] == "demo_arith"
        assert batch.extra["extra_info"][b] == row["extra_info"]
        assert batch.extra["reward_model"][b] == row["reward_model"]
    assert batch.index.tolist() == picks
    assert batch.group_index.tolist() == [0, 1, 2] and batch.repeat_index.tolist() == [0, 0, 0]
    for t in (batch.input_ids, batch.attention_mask, batch.position_ids, batch.teacher_input_ids):
        assert t.dtype == torch.long
    assert batch.teacher_input_ids.shape == (3, P + R)


def test_masks_come_from_lengths_when_pad_equals_eos(demo, tok):
    tok2 = copy.deepcopy(tok)
    tok2.pad_token = tok2.eos_token
    ds = PromptDataset(str(demo.train_file), tok2, cfg(str(demo.train_file)))
    assert ds.pad_token_id == tok2.eos_token_id
    b = ds.batch([0])
    n = int(b.teacher_response_mask[0].sum())
    ids = b.teacher_response_ids[0].tolist()
    assert ids[n - 1] == tok2.eos_token_id and ids[n:] == [tok2.eos_token_id] * (R - n)
    assert b.teacher_response_mask[0].tolist() == [1] * n + [0] * (R - n)


def test_standard_mode_has_no_teacher_fields(demo, tok):
    ds = PromptDataset(str(demo.train_standard_file), tok, cfg(str(demo.train_standard_file)))
    assert ds.mode is Mode.STANDARD
    b = ds.batch([0, 1]).repeat(2)
    assert b.teacher_input_ids is None and b.teacher_response is None and b.response_length is None
    assert b.ground_truth[0] == b.ground_truth[1]


def test_prompt_key_content_and_numpy_messages(tmp_path, tok):
    f = write(tmp_path / "c.parquet", [{"content": msgs("What is 1 + 2?"), "teacher_response": "3"}])
    ds = PromptDataset(f, tok, cfg(f, prompt_key="content"))
    assert ds.mode is Mode.GAD and ds[0].extra == {}
    import numpy as np

    arr = np.empty(1, dtype=object)
    arr[0] = {"role": "user", "content": "hi"}
    assert check_messages(arr, "x row 0", "prompt") == [{"role": "user", "content": "hi"}]


# ----------------------------------------------------------------------------- truncation


def _long_file(tmp_path: Path, teacher: str = "1 + 2 = 3. The answer is 3.") -> str:
    rows = [
        {"prompt": msgs("What is 1 + 2?"), "teacher_response": teacher},
        {"prompt": msgs("What is the sum of 11 and 22 and 33 and 44?"), "teacher_response": teacher},
    ]
    return write(tmp_path / "long.parquet", rows)


def test_truncation_left_right_error_and_filter(tmp_path, tok):
    f = _long_file(tmp_path)
    full = tok.apply_chat_template(msgs("What is the sum of 11 and 22 and 33 and 44?"),
                                   add_generation_prompt=True, tokenize=True, return_dict=False)
    limit = 14
    assert len(full) > limit >= 11
    left = PromptDataset(f, tok, cfg(f, max_prompt_length=limit, truncation="left"))
    assert left[1].prompt_ids == full[-limit:] and left.stats.truncated_prompts == 1
    right = PromptDataset(f, tok, cfg(f, max_prompt_length=limit, truncation="right"))
    assert right[1].prompt_ids == full[:limit]
    assert right.batch([1]).attention_mask.sum().item() == limit
    with pytest.raises(DataError, match=rf"{f} row 1: the prompt has {len(full)} tokens.*max_prompt_length={limit}"):
        PromptDataset(f, tok, cfg(f, max_prompt_length=limit))
    kept = PromptDataset(f, tok, cfg(f, max_prompt_length=limit, filter_overlong_prompts=True))
    assert len(kept) == 1 and kept.stats.dropped_overlong_prompts == 1 and kept[0].index == 0


def test_teacher_truncation_keeps_eos_only_if_it_fits(tmp_path, tok):
    f = _long_file(tmp_path)
    text = "1 + 2 = 3. The answer is 3."
    ids = tok.encode(text, add_special_tokens=False)
    exact = PromptDataset(f, tok, cfg(f, max_response_length=len(ids) + 1))
    assert exact[0].teacher_response_ids == ids + [tok.eos_token_id]
    assert exact.stats.truncated_teacher_responses == 0
    short = PromptDataset(f, tok, cfg(f, max_response_length=len(ids)))
    assert short[0].teacher_response_ids == ids and short.stats.truncated_teacher_responses == 2
    assert short.batch([0]).teacher_response_mask.sum().item() == len(ids)


# ----------------------------------------------------------------------------- grouping


def test_repeat_groups_rows_consecutively_with_teacher(demo, tok):
    ds = PromptDataset(str(demo.train_file), tok, cfg(str(demo.train_file)))
    b = ds.batch([5, 3, 9])
    r = b.repeat(4)
    assert len(r) == 12
    assert r.group_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r.repeat_index.tolist() == [0, 1, 2, 3] * 3
    assert r.index.tolist() == [5] * 4 + [3] * 4 + [9] * 4
    for k in range(12):
        g = k // 4
        assert torch.equal(r.input_ids[k], b.input_ids[g])
        assert torch.equal(r.teacher_input_ids[k], b.teacher_input_ids[g])
        assert torch.equal(r.teacher_position_ids[k], b.teacher_position_ids[g])
        assert r.teacher_response[k] == b.teacher_response[g]
        assert r.extra["extra_info"][k] == b.extra["extra_info"][g]
    rr = r.repeat(2)
    assert rr.group_index.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert rr.repeat_index.tolist() == list(range(8)) * 3
    with pytest.raises(ValueError):
        b.repeat(0)


# ----------------------------------------------------------------------------- bad input


def test_missing_unreadable_and_directory_files(tmp_path, tok):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match=f"{missing}: data file not found"):
        PromptDataset(missing, tok, cfg(missing))
    text = tmp_path / "bad.parquet"
    text.write_text("not parquet at all\n")
    with pytest.raises(DataError, match=f"{text}: cannot read as a parquet file"):
        PromptDataset(str(text), tok, cfg(str(text)))
    with pytest.raises(DataError, match="not a file"):
        PromptDataset(str(tmp_path), tok, cfg(str(tmp_path)))


def test_missing_prompt_column_lists_columns(tmp_path, tok):
    f = write(tmp_path / "p.parquet", [{"question": "hi", "teacher_response": "x"}])
    with pytest.raises(DataError, match=rf"{f}: no prompt column 'prompt'.*available columns: question, teacher_response"):
        PromptDataset(f, tok, cfg(f))


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("What is 1 + 2?", "expected a non-empty list"),
        ([], "expected a non-empty list"),
        (["hello"], "message 0 is 'hello'"),
        ([{"role": "user"}], "message 0 has content=None"),
        ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], "message 1 has role=3"),
    ],
)
def test_bad_prompt_names_file_and_row(tmp_path, tok, monkeypatch, bad, fragment):
    from megatron_gad.data import dataset as dsmod

    f = str(tmp_path / "bad_prompt.parquet")
    fake = {"prompt": [msgs("What is 1 + 2?"), bad]}
    monkeypatch.setattr(dsmod, "read_parquet_rows", lambda path: (["prompt"], fake))
    with pytest.raises(DataError, match=re.escape(f"{f} row 1: ") + ".*" + re.escape(fragment)):
        PromptDataset(f, tok, cfg(f))


def test_bad_prompt_from_real_parquet(tmp_path, tok):
    f = write(tmp_path / "str.parquet", [{"prompt": "What is 1 + 2?"}, {"prompt": "x"}])
    with pytest.raises(DataError, match=rf"{f} row 0: expected a non-empty list of"):
        PromptDataset(f, tok, cfg(f))


@pytest.mark.parametrize("value", [7, "", "   "])
def test_invalid_teacher_response_error_or_drop(tmp_path, tok, value):
    rows = [{"prompt": msgs("What is 1 + 2?"), "teacher_response": "1 + 2 = 3."},
            {"prompt": msgs("What is 2 + 2?"), "teacher_response": "2 + 2 = 4."},
            {"prompt": msgs("What is 3 + 2?"), "teacher_response": value}]
    if isinstance(value, int):
        rows = [dict(r, teacher_response=i + 1 if i < 2 else value) for i, r in enumerate(rows)]
    f = write(tmp_path / "t.parquet", rows)
    row = 0 if isinstance(value, int) else 2
    with pytest.raises(DataError, match=rf"{f} row {row}: column 'teacher_response' must be a non-empty string"):
        PromptDataset(f, tok, cfg(f))
    if not isinstance(value, int):
        ds = PromptDataset(f, tok, cfg(f, invalid_teacher_response="drop"))
        assert len(ds) == 2 and ds.stats.dropped_invalid_teacher == 1 and ds.mode is Mode.GAD


def test_no_rows_at_all(tmp_path, tok):
    schema = pa.schema([("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    f = write(tmp_path / "empty.parquet", [], schema)
    with pytest.raises(DataError, match=f"no rows at all in {f}"):
        PromptDataset(f, tok, cfg(f))
    g = _long_file(tmp_path)
    with pytest.raises(DataError, match=r"train: no rows left in .*2 rows read, 0 kept"):
        PromptDataset(g, tok, cfg(g, max_prompt_length=3, filter_overlong_prompts=True))


def test_mixed_teacher_rows_error_or_drop(tmp_path, tok):
    with_t = write(tmp_path / "a.parquet", [{"prompt": msgs("What is 1 + 2?"), "teacher_response": "3"},
                                             {"prompt": msgs("What is 1 + 3?"), "teacher_response": None}])
    without = write(tmp_path / "b.parquet", [{"prompt": msgs("What is 2 + 2?")}] * 2)
    files = [with_t, without]
    with pytest.raises(DataError, match=rf"3 of 4 rows have no 'teacher_response'.*{with_t} row 1; {without} row 0; {without} row 1"):
        PromptDataset(files, tok, cfg(files))
    ds = PromptDataset(files, tok, cfg(files, drop_rows_without_teacher=True))
    assert ds.mode is Mode.GAD and len(ds) == 1 and ds.stats.dropped_without_teacher == 3
    assert ds[0].source == f"{with_t} row 0"


# ----------------------------------------------------------------------------- config and loaders


def test_config_validation_and_file_strings():
    c = DataConfig(train_files="a.parquet,b.parquet", val_files="v.parquet")
    assert c.train_files == ["a.parquet", "b.parquet"] and c.val_files == ["v.parquet"]
    c.validate()
    with pytest.raises(ValueError, match=r"data.truncation: invalid value 'middle'; valid choices: error, left, right"):
        DataConfig(train_files="a", truncation="middle").validate()
    with pytest.raises(ValueError, match=r"data.invalid_teacher_response: .*valid choices: error, drop"):
        DataConfig(train_files="a", invalid_teacher_response="keep").validate()
    DataConfig().validate()  # files may be filled in later; build_loaders requires them
    with pytest.raises(ValueError, match=r"data.max_prompt_length must be a positive integer"):
        DataConfig(train_files="a", max_prompt_length=0).validate()


def test_build_loaders(demo, tok):
    c = cfg(str(demo.train_file), val_files=str(demo.val_file), train_batch_size=64)
    train, val = build_loaders(c, tok)
    assert len(train) == 2000 // 64 and train.mode is Mode.GAD
    (vb,) = list(val)
    assert len(vb) == 200 and vb.index.tolist() == list(range(200))
    with pytest.raises(DataError, match="data.train_files: at least one parquet file is required"):
        build_loaders(DataConfig(), tok)
    with pytest.raises(DataError, match="fewer than data.train_batch_size=4096"):
        build_loaders(cfg(str(demo.train_file), train_batch_size=4096), tok)


def test_counts_are_logged_once(tmp_path, tok, caplog):
    f = _long_file(tmp_path)
    with caplog.at_level("INFO", logger="megatron_gad.data.dataset"):
        PromptDataset(f, tok, cfg(f, max_prompt_length=14, truncation="left", max_response_length=5))
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "2 rows read, 2 kept, truncated prompts: 1, truncated teacher responses: 2" in record.getMessage()


def test_chat_template_failure_names_the_row(tmp_path, tok):
    """A template that raises on one row's content reports that row, not a jinja traceback; a
    template failing only on several rows together still gets one DataError naming them."""
    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}"
        "{{ raise_exception('content is forbidden') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    path = write(tmp_path / "t.parquet", [{"prompt": msgs("1 + 2")}, {"prompt": msgs("forbidden")}])
    with pytest.raises(DataError, match=r"t\.parquet row 1: the chat template failed: content is forbidden"):
        PromptDataset(path, strict, cfg(path))

    class BatchOnlyFailure:  # renders single conversations, refuses batches of several
        chat_template = "x"

        def apply_chat_template(self, conversations, **kw):
            if len(conversations) > 1:
                raise RuntimeError("batch refused")
            return [[5]]

    from megatron_gad.data.dataset import RawRow, encode_prompts

    rows = [RawRow(f"u.parquet row {i}", msgs(t), None, None, None, {}) for i, t in enumerate("ab")]
    assert encode_prompts(BatchOnlyFailure(), rows[:1]) == [[5]]
    with pytest.raises(DataError, match=r"u\.parquet row 0 \.\. u\.parquet row 1: the chat template failed on "
                                        r"these rows together but on none alone: batch refused"):
        encode_prompts(BatchOnlyFailure(), rows)
