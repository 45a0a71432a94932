"""Reward functions: loading user files, the built-in demo reward, bad return values."""

from __future__ import annotations

import pytest

from megatron_gad.rewards import RewardFunctionError, load_reward_fn, score_responses


def test_user_function_is_loaded_and_applied(tmp_path) -> None:
    path = tmp_path / "my_reward.py"
    path.write_text("def length_reward(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return len(solution_str) / 10\n")
    fn = load_reward_fn(str(path), "length_reward")
    scores = score_responses(fn, ["abc", "abcdefghij"], ["d", "d"], [None, None])
    assert scores.tolist() == pytest.approx([0.3, 1.0])


def test_builtin_is_the_demo_exact_match() -> None:
    fn = load_reward_fn(None)
    scores = score_responses(fn, ["2 + 3 = 5. The answer is 5.", "The answer is 6."], ["demo", "demo"], ["5", "5"])
    assert scores.tolist() == [1.0, 0.0]


def test_errors_name_the_file_function_and_row(tmp_path) -> None:
    with pytest.raises(RewardFunctionError, match="no such file"):
        load_reward_fn(str(tmp_path / "missing.py"))
    path = tmp_path / "r.py"
    path.write_text("def other(a, b, c, d=None):\n    return 'high'\n")
    with pytest.raises(RewardFunctionError, match=r"'compute_score' is not a function .* \(functions: other\)"):
        load_reward_fn(str(path))
    with pytest.raises(RewardFunctionError, match="for row 0"):
        score_responses(load_reward_fn(str(path), "other"), ["x"], [None], [None])


def test_a_file_with_dataclasses_loads() -> None:
    import os

    import megatron_gad.data.demo as demo

    fn = load_reward_fn(os.path.abspath(demo.__file__), "demo_reward")
    assert score_responses(fn, ["The answer is 7."], ["demo"], ["7"]).tolist() == [1.0]


def test_extra_info_is_the_rows_extra_info_column(tmp_path) -> None:
    """verl's contract: ``extra_info`` is the row's ``extra_info`` column, not all pass-through
    columns; rows of data without that column get None."""
    from megatron_gad.data import Mode, TokenizedRow, collate_rows

    def row(i: int, extra: dict) -> TokenizedRow:
        return TokenizedRow(index=i, source=f"f row {i}", raw_prompt=[{"role": "user", "content": "q"}],
                            prompt_ids=[5], teacher_response=None, teacher_response_ids=None, ground_truth="1",
                            data_source="src", extra=extra)

    with_column = collate_rows([row(0, {"extra_info": {"split": "train"}, "other": 1}),
                                row(1, {"extra_info": {"split": "test"}, "other": 2})], Mode.STANDARD, 2, 2, 0)
    path = tmp_path / "split_reward.py"
    path.write_text("def by_split(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return 1.0 if extra_info['split'] == 'train' else -1.0\n")
    fn = load_reward_fn(str(path), "by_split")
    infos = with_column.extra_infos()
    assert infos == [{"split": "train"}, {"split": "test"}]
    assert score_responses(fn, ["a", "b"], ["src", "src"], ["1", "1"], infos).tolist() == [1.0, -1.0]
    without = collate_rows([row(0, {"other": 1})], Mode.STANDARD, 2, 2, 0)
    assert without.extra_infos() == [None]
