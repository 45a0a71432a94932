"""Experience assembly: joined sequences, advantages per estimator, teacher-forced diagnostic."""

from __future__ import annotations

import pytest
import torch

from megatron_gad.experience import compute_advantages, join, teacher_forced_scores


def test_join_masks_and_positions() -> None:
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    pmask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    resp = torch.tensor([[11, 12, 0], [13, 0, 0]])
    rmask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    seq = join(prompts, pmask, resp, rmask)
    assert seq.input_ids.tolist() == [[0, 0, 5, 6, 11, 12, 0], [7, 8, 9, 10, 13, 0, 0]]
    assert seq.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]]
    assert seq.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 4, 4]]
    assert torch.equal(seq.responses, resp) and seq.prompt_length == 4


def test_grpo_advantages_broadcast_over_valid_tokens() -> None:
    scores = torch.tensor([1.0, 3.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    adv, returns = compute_advantages("grpo", scores, groups, mask)
    a = 1.0 / (2 ** 0.5 + 1e-6)  # (x - mean) / unbiased std for the pair (1, 3)
    expected = torch.tensor([[-a, -a, 0], [a, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert returns is None
    torch.testing.assert_close(adv, expected)


def test_gae_puts_the_score_on_the_last_token() -> None:
    scores = torch.tensor([2.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    values = torch.zeros(1, 4)
    adv, returns = compute_advantages("gae", scores, torch.tensor([0]), mask, values=values, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[2.0, 2.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="needs critic values"):
        compute_advantages("gae", scores, torch.tensor([0]), mask)
    with pytest.raises(ValueError, match="grpo, gae"):
        compute_advantages("reinforce", scores, torch.tensor([0]), mask)


def test_teacher_forced_scores_rank_the_copies() -> None:
    groups = torch.tensor([4, 4, 4, 9, 9, 9])
    assert teacher_forced_scores(groups, 3).tolist() == [0, 1, 2, 0, 1, 2]
    adv, _ = compute_advantages("grpo", teacher_forced_scores(groups, 3), groups, torch.ones(6, 1))
    assert adv[:3, 0].tolist() == sorted(adv[:3, 0].tolist())  # the known ranking survives GRPO
    with pytest.raises(ValueError, match="consecutive"):
        teacher_forced_scores(torch.tensor([0, 1, 0, 1]), 2)


def test_kl_penalty_enters_the_token_rewards() -> None:
    """GRPO normalises each row's score minus its summed penalty; GAE subtracts the penalty per
    token; padding never carries a penalty."""
    from megatron_gad.losses import gae_advantages, grpo_advantages

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, generator=g)
    groups = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    penalty = torch.rand(4, 3, generator=g)
    adv, _ = compute_advantages("grpo", scores, groups, mask, token_penalty=penalty)
    totals = scores - (penalty * mask).sum(-1)
    torch.testing.assert_close(adv, grpo_advantages(totals, groups).unsqueeze(1) * mask)
    values = torch.randn(4, 3, generator=g)
    adv, ret = compute_advantages("gae", scores, groups, mask, values=values, gamma=0.9, lam=0.8, token_penalty=penalty)
    rewards = -(penalty * mask)
    for b, n in enumerate(mask.sum(-1).tolist()):
        rewards[b, n - 1] += scores[b]
    ref_adv, ref_ret = gae_advantages(rewards, values, mask.float(), 0.9, 0.8)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_kl_controller_fixed_and_adaptive() -> None:
    from megatron_gad.experience import KLController

    fixed = KLController(0.01)
    fixed.update(5.0, 1000)
    assert fixed.coef == 0.01
    adaptive = KLController(0.01, adaptive=True, target_kl=0.1, horizon=1000)
    adaptive.update(0.3, 100)  # KL far above target: error clipped to +0.2
    assert adaptive.coef == pytest.approx(0.01 * (1 + 0.2 * 100 / 1000))
    adaptive.update(0.09, 100)  # slightly below target: error -0.1
    assert adaptive.coef == pytest.approx(0.01 * 1.02 * (1 - 0.1 * 100 / 1000))
