"""Validation sums -> metrics (megatron_gad.validation), on real demo-task rows."""

import pytest
import torch

from megatron_gad.data import Mode, TokenizedRow, collate_rows
from megatron_gad.data.demo import STYLES_DATA_SOURCE, teacher_answer
from megatron_gad.validation import CHECKS, ValidationSums, checker_counts


def _batch(sources: list[str], pairs: list[tuple[int, int]]):
    rows = [TokenizedRow(index=i, source=f"f row {i}", raw_prompt=[{"role": "user", "content": "q"}], prompt_ids=[5],
                         teacher_response=None, teacher_response_ids=None, ground_truth="1", data_source=src,
                         extra={"extra_info": {"a": a, "b": b}})
            for i, (src, (a, b)) in enumerate(zip(sources, pairs))]
    return collate_rows(rows, Mode.STANDARD, 2, 2, 0)


def test_checker_counts_skip_rows_of_other_data() -> None:
    batch = _batch([STYLES_DATA_SOURCE, STYLES_DATA_SOURCE, "other"], [(3, 4), (3, 4), (3, 4)])
    right, wrong_sum = teacher_answer(3, 4), teacher_answer(3, 4).replace("7", "8")
    counts = checker_counts(batch, [right, wrong_sum, right])
    # one_style twice, valid twice (one consistent wrong sum is still valid), correct once; 2 rows checked
    assert counts.tolist() == [2.0, 2.0, 1.0, 2.0]


def test_metrics_are_ratios_of_the_data_parallel_sums() -> None:
    sums = ValidationSums()
    for name, value in (("rows", 4), ("exact", 1), ("matched_tokens", 6), ("teacher_tokens", 8),
                        ("reward", 3.0), ("teacher_log_prob", -4.0)):
        sums.add(name, value)
    batch = _batch([STYLES_DATA_SOURCE] * 2, [(1, 2), (5, 6)])
    sums.add_checks(batch, [teacher_answer(1, 2), "no answer"], sampled=False)
    sums.add_checks(batch, [teacher_answer(1, 2), teacher_answer(5, 6)], sampled=True)
    two_replicas = lambda t: 2 * t  # noqa: E731 - an all-reduce over two identical replicas
    out = sums.metrics(two_replicas, gad=True, teacher_forced=True, reward=True)
    assert out["val/teacher_exact_match"] == pytest.approx(0.25)
    assert out["val/teacher_token_agreement"] == pytest.approx(0.75)
    assert out["val/teacher_log_prob"] == pytest.approx(-0.5)
    assert out["val/reward"] == pytest.approx(0.75)
    assert [out[f"val/checker_{c}"] for c in CHECKS] == [0.5, 0.5, 0.5]
    assert [out[f"val/checker_{c}_sampled"] for c in CHECKS] == [1.0, 1.0, 1.0]
    plain = sums.metrics(lambda t: t, gad=False, teacher_forced=False, reward=False)
    assert not any(k.startswith(("val/teacher", "val/reward")) for k in plain)


def test_no_checker_metrics_without_demo_rows() -> None:
    sums = ValidationSums()
    sums.add("rows", 2)
    sums.add_checks(_batch(["other", "other"], [(1, 1), (2, 2)]), ["a", "b"], sampled=False)
    assert sums.metrics(lambda t: t, gad=False, teacher_forced=False, reward=False) == {}
    assert torch.equal(sums.checks, torch.zeros_like(sums.checks))
