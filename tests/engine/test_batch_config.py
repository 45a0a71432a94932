"""Typed engine batches and settings: shapes, pairing, splitting and the errors users can cause."""

from __future__ import annotations

import pytest
import torch

from megatron_gad.engine import (
    ActorConfig,
    CriticLossConfig,
    PairBatch,
    PolicyBatch,
    SequenceBatch,
    local_mini_batch_size,
    split_rows,
)
from megatron_gad.engine.batch import by_length, shuffled, take_rows, trim_padding


def seq(rows: int, prompt: int, resp: int, lengths: list[int]) -> SequenceBatch:
    ids = torch.arange(rows * (prompt + resp)).view(rows, prompt + resp) + 1
    mask = torch.ones(rows, prompt + resp, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, prompt + n:] = 0
    return SequenceBatch.from_ids(ids * mask, mask, mask[:, prompt:].clone())


def test_sequence_batch_layout_and_shape_errors() -> None:
    b = seq(2, 3, 4, [4, 1])
    assert b.rows == 2 and b.prompt_length == 3
    assert torch.equal(b.responses, b.input_ids[:, 3:])
    with pytest.raises(ValueError, match="attention_mask"):
        SequenceBatch(b.input_ids, b.attention_mask[:, 1:], b.position_ids, b.response_mask)
    with pytest.raises(ValueError, match="response_mask"):
        SequenceBatch(b.input_ids, b.attention_mask, b.position_ids, b.response_mask[:1])


def test_pair_batch_stacks_student_then_teacher_right_padded() -> None:
    student, teacher = seq(2, 3, 4, [4, 2]), seq(2, 3, 2, [1, 2])
    stacked = PairBatch(student, teacher).stacked()
    assert stacked.input_ids.shape == (4, 7) and stacked.response_mask.shape == (4, 4)
    assert torch.equal(stacked.input_ids[:2], student.input_ids)
    assert torch.equal(stacked.input_ids[2:, :5], teacher.input_ids)
    assert stacked.attention_mask[2:, 5:].sum() == 0 and stacked.response_mask[2:, 2:].sum() == 0
    with pytest.raises(ValueError, match="align row by row"):
        PairBatch(student, seq(3, 3, 2, [1, 1, 1]))


def test_split_rows_recurses_and_names_the_setting() -> None:
    b = seq(4, 2, 3, [3, 2, 1, 0])
    policy = PolicyBatch(b, torch.randn(4, 3), torch.randn(4, 3))
    parts = split_rows(policy, 2, "actor.ppo_micro_batch_size_per_gpu")
    assert [p.rows for p in parts] == [2, 2]
    assert torch.equal(parts[1].old_log_probs, policy.old_log_probs[2:])
    assert torch.equal(parts[1].seq.response_mask, b.response_mask[2:]) and parts[1].ref_log_probs is None
    with pytest.raises(ValueError, match="actor.ppo_micro_batch_size_per_gpu=3"):
        split_rows(policy, 3, "actor.ppo_micro_batch_size_per_gpu")


def test_shuffled_permutes_every_field_alike_and_is_seeded() -> None:
    b = seq(6, 2, 3, [3, 2, 1, 0, 3, 1])
    policy = PolicyBatch(b, torch.arange(6.0)[:, None].expand(6, 3), torch.randn(6, 3))
    one, same, other = shuffled(policy, 7), shuffled(policy, 7), shuffled(policy, 8)
    order = one.old_log_probs[:, 0].long()
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    assert torch.equal(one.seq.input_ids, b.input_ids[order]) and torch.equal(one.advantages, policy.advantages[order])
    assert torch.equal(same.old_log_probs, one.old_log_probs) and not torch.equal(other.old_log_probs, one.old_log_probs)


def test_by_length_groups_rows_so_each_micro_batch_trims_to_its_own_longest_row() -> None:
    b = seq(6, 3, 5, [5, 1, 3, 1, 5, 3])
    b.attention_mask[1, 0] = 0  # row 1: one token of left padding (a shorter prompt)
    order = by_length(b)
    assert order.tolist() == [1, 3, 2, 5, 0, 4]  # by response length, then prompt length, stable
    micro = split_rows(take_rows(b, order), 2, "micro")
    widths = [m.response_mask.shape[1] for m in trim_padding([micro[0]]) + trim_padding([micro[2]])]
    assert widths == [1, 5]  # trimmed one micro-batch at a time: the shortest pair keeps one column
    assert trim_padding(micro)[0].response_mask.shape[1] == 5  # trimmed together: all keep the longest


def test_actor_config_validation_names_fields() -> None:
    cfg = ActorConfig(clip_ratio=0.2, clip_ratio_high=0.28)
    assert (cfg.clip_low, cfg.clip_high) == (0.2, 0.28)
    cfg.validate()
    with pytest.raises(ValueError, match="policy_loss"):
        ActorConfig(policy_loss="grpo").validate()
    with pytest.raises(ValueError, match="seq-mean-token-sum"):
        ActorConfig(policy_loss="gspo", loss_agg_mode="seq-mean-token-sum").validate()
    with pytest.raises(ValueError, match="kl_loss_type"):
        ActorConfig(kl_loss_type="forward").validate()
    with pytest.raises(ValueError, match="clip_ratio_low"):
        ActorConfig(clip_ratio_low=-0.1).validate()
    ActorConfig(policy_loss="ppo", loss_agg_mode="seq-mean-token-sum").validate()


def test_critic_config_and_mini_batch_size() -> None:
    CriticLossConfig().validate()
    with pytest.raises(ValueError, match="critic.cliprange_value"):
        CriticLossConfig(cliprange_value=-1.0).validate()
    with pytest.raises(ValueError, match="critic.loss_agg_mode"):
        CriticLossConfig(loss_agg_mode="mean").validate()
    assert local_mini_batch_size(4, 8, 2, "actor_rollout_ref.actor") == 16
    with pytest.raises(ValueError, match="actor_rollout_ref.actor.ppo_mini_batch_size"):
        local_mini_batch_size(3, 1, 2, "actor_rollout_ref.actor")
