"""Batch and loader tests: collate padding from lengths, batch invariants, resumable order."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from megatron_gad.data import Mode, PromptBatch, PromptLoader, ResumableSampler, TokenizedRow, collate_rows
from megatron_gad.data.batch import position_ids_from_mask


def row(i: int, prompt: list[int], teacher: list[int] | None) -> TokenizedRow:
    return TokenizedRow(
        index=i,
        source=f"f row {i}",
        raw_prompt=[{"role": "user", "content": str(i)}],
        prompt_ids=prompt,
        teacher_response=None if teacher is None else f"t{i}",
        teacher_response_ids=teacher,
        ground_truth=str(i),
        data_source="src",
        extra={"k": i} if i % 2 else {"j": i},
    )


def test_collate_pads_left_and_right_from_lengths():
    eos = pad = 9  # pad equals EOS: masks must still come from lengths
    rows = [row(0, [5, 6, 7], [1, eos]), row(1, [4], [2, 3, eos]), row(2, [], [eos])]
    b = collate_rows(rows, Mode.GAD, max_prompt_length=4, max_response_length=3, pad_token_id=pad)
    assert b.input_ids.tolist() == [[9, 5, 6, 7], [9, 9, 9, 4], [9, 9, 9, 9]]
    assert b.attention_mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert b.teacher_response_ids.tolist() == [[1, 9, 9], [2, 3, 9], [9, 9, 9]]
    assert b.teacher_response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert b.teacher_attention_mask.tolist()[0] == [0, 1, 1, 1, 1, 1, 0]
    assert b.teacher_position_ids.tolist()[0] == [0, 0, 1, 2, 3, 4, 4]
    assert b.teacher_position_ids.tolist()[2] == [0, 0, 0, 0, 0, 0, 0]
    assert b.extra == {"j": [0, None, 2], "k": [None, 1, None]}
    with pytest.raises(ValueError, match="does not fit"):
        collate_rows([row(0, [1] * 5, [1])], Mode.GAD, 4, 3, 0)


def test_position_ids_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 11, generator=g) > 0.4).long()
    ref = []
    for m in mask.tolist():
        pos, out = -1, []
        for v in m:
            pos += v
            out.append(max(pos, 0))
        ref.append(out)
    assert position_ids_from_mask(mask).tolist() == ref


def test_batch_mode_invariants_and_select():
    std = collate_rows([row(0, [1], None), row(1, [2], None)], Mode.STANDARD, 2, 2, 0)
    assert std.teacher_input_ids is None and std.mode is Mode.STANDARD
    with pytest.raises(ValueError, match="GAD mode needs a teacher response"):
        collate_rows([row(0, [1], None)], Mode.GAD, 2, 2, 0)
    with pytest.raises(ValueError, match="GAD PromptBatch needs"):
        PromptBatch(**{**std.__dict__, "mode": Mode.GAD})
    s = std.repeat(3).select([5, 0])
    assert s.index.tolist() == [1, 0] and s.group_index.tolist() == [1, 0] and s.repeat_index.tolist() == [2, 0]
    assert s.ground_truth == ["1", "0"] and s.extra == {"j": [None, 0], "k": [1, None]}


class FakeSource:
    mode = Mode.STANDARD

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: Sequence[int]) -> PromptBatch:
        return collate_rows([row(i, [1], None) for i in indices], self.mode, 2, 2, 0)


def _take(loader: PromptLoader, steps: int, epochs: int) -> list[list[int]]:
    """Run up to ``steps`` batches, continuing across epochs until ``epochs`` is reached."""
    out: list[list[int]] = []
    while loader.epoch < epochs and len(out) < steps:
        for b in loader:
            out.append(b.index.tolist())
            if len(out) == steps:
                break
    return out


@pytest.mark.parametrize("stop", [1, 3, 4, 6])
def test_resume_gives_the_same_order(stop):
    full = PromptLoader(FakeSource(10), batch_size=3, shuffle=True, seed=7, drop_last=True)
    reference = _take(full, steps=100, epochs=3)
    assert len(reference) == 9  # 3 full batches per epoch, the last row dropped
    first = PromptLoader(FakeSource(10), batch_size=3, shuffle=True, seed=7, drop_last=True)
    head = _take(first, steps=stop, epochs=3)
    state = first.state_dict()
    resumed = PromptLoader(FakeSource(10), batch_size=3, shuffle=True, seed=7, drop_last=True)
    resumed.load_state_dict(state)
    tail = _take(resumed, steps=100, epochs=3)
    assert head + tail == reference


def test_order_properties():
    a = ResumableSampler(10, 4, shuffle=True, seed=1, drop_last=False)
    assert len(a) == 3
    e0 = [i for b in a for i in b]
    e1 = [i for b in a for i in b]
    assert sorted(e0) == list(range(10)) and e0 != e1 and a.epoch == 2
    b = ResumableSampler(10, 4, shuffle=True, seed=2, drop_last=False)
    assert [i for x in b for i in x] != e0
    c = ResumableSampler(10, 4, shuffle=False, seed=1, drop_last=True)
    assert list(c) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="num_rows=10, now num_rows=11"):
        ResumableSampler(11, 4, True, 1, True).load_state_dict(a.state_dict())


def test_state_points_at_the_next_batch_and_validation_restarts():
    loader = PromptLoader(FakeSource(6), batch_size=3, shuffle=False, seed=1, drop_last=True)
    it = iter(loader)
    next(it)
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["position"] == 1
    next(it)  # the last batch of epoch 0: the state already points at epoch 1
    assert loader.epoch == 1 and loader.state_dict()["position"] == 0
    val = PromptLoader(FakeSource(5), batch_size=2, shuffle=False, seed=1, drop_last=False, restart_each_pass=True)
    assert next(iter(val)).index.tolist() == [0, 1]
    assert next(iter(val)).index.tolist() == [0, 1]
    assert [b.index.tolist() for b in val] == [[0, 1], [2, 3], [4]]
