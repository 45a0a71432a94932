"""grpo_advantages and gae_advantages against slow loop references."""

import statistics

import pytest
import torch

from megatron_gad.losses import gae_advantages, grpo_advantages, masked_whiten


def ref_grpo(scores: list[float], groups: list[int], norm_by_std: bool, eps: float) -> list[float]:
    out = []
    for i, s in enumerate(scores):
        members = [scores[j] for j in range(len(scores)) if groups[j] == groups[i]]
        if len(members) == 1:
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        out.append((s - mean) / (statistics.stdev(members) + eps) if norm_by_std else s - mean)
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_reference_with_unsorted_noncontiguous_groups(norm_by_std: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    groups = [1000, 7, 42, 7, 1000, 3, 42, 7, 1000, 42, 7, 99]  # 99 and 3 are groups of one
    scores = torch.randn(len(groups), generator=gen, dtype=torch.float64)
    got = grpo_advantages(scores, torch.tensor(groups), norm_by_std=norm_by_std)
    want = ref_grpo(scores.tolist(), groups, norm_by_std, 1e-6)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert got[5] == 0 and got[11] == 0
    # a permutation of the batch permutes the advantages
    perm = torch.randperm(len(groups), generator=gen)
    permuted = grpo_advantages(scores[perm], torch.tensor(groups)[perm], norm_by_std=norm_by_std)
    torch.testing.assert_close(permuted, got[perm])


def test_grpo_norm_by_std_false_is_plain_centering() -> None:
    scores = torch.tensor([1.0, 3.0, 10.0, 20.0, 60.0])
    groups = torch.tensor([5, 5, 2, 2, 2])
    got = grpo_advantages(scores, groups, norm_by_std=False)
    torch.testing.assert_close(got, torch.tensor([-1.0, 1.0, -20.0, -10.0, 30.0]))


def test_grpo_degenerate_groups_are_zero_not_nan() -> None:
    scores = torch.tensor([2.0, 2.0, 2.0, 5.0], requires_grad=True)
    got = grpo_advantages(scores, torch.tensor([1, 1, 1, 8]))
    assert torch.all(got == 0) and not got.requires_grad and got.dtype == torch.float32
    assert grpo_advantages(torch.tensor([3.0]), torch.tensor([0]))[0] == 0
    assert grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_grpo_float32_standardises_each_group() -> None:
    gen = torch.Generator().manual_seed(1)
    groups = torch.arange(4).repeat_interleave(8)[torch.randperm(32, generator=gen)]
    scores = torch.randn(32, generator=gen) * 5 + 3
    adv = grpo_advantages(scores, groups)
    for g in range(4):
        a = adv[groups == g].double()
        assert abs(a.mean()) < 1e-5 and abs(a.std() - 1) < 1e-4


def test_grpo_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="group_index"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def ref_gae(rewards, values, mask, gamma, lam):
    """Per row, compress the valid positions, run the textbook backward recursion in floats."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        idx = [t for t in range(T) if mask[i][t] > 0]
        running = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = values[i][idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = rewards[i][t] + gamma * next_v - values[i][t]
            running = delta + gamma * lam * running
            adv[i][t] = running
            ret[i][t] = running + values[i][t]
    return adv, ret


def gae_inputs(seed: int, holes: bool):
    gen = torch.Generator().manual_seed(seed)
    B, T = 5, 9
    lengths = [9, 0, 4, 1, 6]
    mask = torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    if holes:
        mask[0, 3] = 0.0
        mask[4, 1] = 0.0
    # garbage at padded positions must not leak into the result
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return rewards, values, mask


@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_reference_with_padding(holes: bool) -> None:
    rewards, values, mask = gae_inputs(2, holes)
    gamma, lam = 0.9, 0.8
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam, whiten=False)
    ref_adv, ref_ret = ref_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))
    assert torch.all(adv[1] == 0) and torch.all(ret[1] == 0)


def test_gae_whitening_and_unwhitened_returns() -> None:
    rewards, values, mask = gae_inputs(3, holes=False)
    gamma, lam = 0.95, 0.7
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    valid = [(i, t) for i in range(5) for t in range(9) if mask[i, t] > 0]
    flat = [ref_adv[i][t] for i, t in valid]
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    want = torch.zeros(5, 9, dtype=torch.float64)
    for i, t in valid:
        want[i, t] = (ref_adv[i][t] - mean) / std
    torch.testing.assert_close(adv, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))


def test_gae_outcome_reward_with_gamma_lam_one_is_reward_to_go_minus_value() -> None:
    values = torch.tensor([[0.5, 0.2, -0.1, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])  # reward on the last valid token; pad garbage
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0, whiten=False)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.8, 1.1, 0.0]]))


def test_masked_whiten_ignores_masked_positions() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    out = masked_whiten(x, mask)
    valid = out[mask.bool()]
    assert abs(valid.mean()) < 1e-6 and abs(valid.std() - 1) < 1e-5
    assert out[0, 2] == 0 and out[1, 1] == 0


def _whiten_my_half(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per rank of a DP=2 group: GAE over this rank's rows, whitened with global statistics."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def dp_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        return t

    rank, half = ps.get_data_parallel_rank(), rewards.shape[0] // 2
    rows = slice(rank * half, (rank + 1) * half)
    return gae_advantages(rewards[rows], values[rows], mask[rows], 0.95, 0.7, reduce=dp_sum)[0]


def test_gae_whitening_over_data_parallel_ranks_equals_the_whole_batch() -> None:
    """Each DP rank holds half the rows (unequal token counts); with ``reduce`` the whitened
    advantages equal the single-process ones, without it they would not."""
    from megatron_gad.runtime.spawn import run_distributed

    rewards, values, mask = gae_inputs(4, holes=True)
    rewards, values, mask = rewards[:4], values[:4], mask[:4]
    mask[0, 5:] = 0.0  # rank 0 holds fewer valid tokens than rank 1
    whole, _ = gae_advantages(rewards, values, mask, 0.95, 0.7)
    halves = run_distributed(_whiten_my_half, 2, args=(rewards, values, mask))
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-12, atol=1e-12)
    local, _ = gae_advantages(rewards[:2], values[:2], mask[:2], 0.95, 0.7)
    assert (local - whole[:2]).abs().max() > 1e-3  # the test would catch rank-local whitening
