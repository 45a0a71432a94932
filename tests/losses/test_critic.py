"""discriminator_loss / discriminator_accuracy / value_loss against slow loop references."""

import math

import pytest
import torch

from megatron_gad.losses import (
    LOSS_AGG_MODES,
    agg_normalizer,
    discriminator_accuracy,
    discriminator_half_points,
    discriminator_loss,
    value_loss,
)

B, T = 6, 7


def test_discriminator_loss_matches_reference_values_and_grads() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    student = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    got = discriminator_loss(teacher, student)
    want = sum(-torch.log(1.0 / (1.0 + torch.exp(-(teacher[i] - student[i])))) for i in range(8))
    want = want / 8
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, (teacher, student))
    g_want = torch.autograd.grad(want, (teacher, student))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    # Bradley-Terry pushes teacher scores up and student scores down
    assert torch.all(g_got[0] < 0) and torch.all(g_got[1] > 0)


def test_discriminator_loss_is_stable_for_huge_gaps() -> None:
    teacher = torch.tensor([1000.0, -1000.0], requires_grad=True)
    student = torch.tensor([-1000.0, 1000.0])
    loss = discriminator_loss(teacher, student)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((0.0 + 2000.0) / 2)
    (g,) = torch.autograd.grad(loss, teacher)
    assert torch.isfinite(g).all()
    assert discriminator_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_discriminator_accuracy() -> None:
    teacher = torch.tensor([1.0, 2.0, 3.0, 0.5])
    student = torch.tensor([0.0, 2.0, 4.0, -1.0])  # win, tie (half a win), loss, win
    acc = discriminator_accuracy(teacher, student)
    assert acc.dtype == torch.float32 and acc.dim() == 0 and acc.item() == pytest.approx(2.5 / 4)
    points = discriminator_half_points(teacher, student)
    assert points.dtype == torch.int64 and points.item() == 5  # 2 per win, 1 per tie


def test_untrained_discriminator_scores_one_half() -> None:
    """A discriminator that scores every response alike (a zero score head) is at chance."""
    same = torch.zeros(6)
    assert discriminator_accuracy(same, same).item() == 0.5
    assert discriminator_loss(same, same).item() == pytest.approx(math.log(2))


def test_vf_clipfrac_ignores_rounding_of_an_inactive_clip() -> None:
    """Where |v - v_old| < c the clip is inactive: nothing is clipped, whatever the rounding.

    With |v| much smaller than |v_old|, ``v_old + (v - v_old)`` rounds a few ulps away from ``v``
    in float32, so the "clipped" square can exceed the unclipped one by rounding alone. Counting
    on the squares alone made the metric depend on the last bits of ``v``, i.e. on the layout.
    """
    v = torch.tensor([-0.019070131704211235, -0.0039131976664066315])
    old = torch.tensor([0.08892185986042023, 0.17228271067142487])
    ret = torch.tensor([0.43676239252090454, -0.698036789894104])
    c = 0.2
    assert torch.all((v - old).abs() < c)
    rounded = old + (v - old).clamp(-c, c)
    assert torch.all((rounded - ret).square() > (v - ret).square()), "the inputs no longer show the rounding"
    loss, m = value_loss(v[None], old[None], ret[None], torch.ones(1, 2), c, "token-mean")
    assert m["vf_clipped"].item() == 0 and m["vf_clipfrac"].item() == 0.0
    torch.testing.assert_close(loss, 0.5 * (v - ret).square().mean())


def test_vf_clipfrac_counts_active_clips_where_the_clipped_term_wins() -> None:
    old = torch.zeros(1, 4)
    v = torch.tensor([[0.5, 0.5, -0.5, 0.1]])  # active, active, active, inactive
    ret = torch.tensor([[1.0, -1.0, 1.0, 5.0]])  # clipped term larger: no, yes, no, (inactive)
    _, m = value_loss(v, old, ret, torch.ones(1, 4), 0.2, "token-mean")
    assert m["vf_clipped"].item() == 1 and m["vf_clipfrac"].item() == pytest.approx(0.25)


def test_discriminator_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        discriminator_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="same shape"):
        discriminator_accuracy(torch.zeros(3), torch.zeros(3, 1))


def value_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=gen) < 0.7).double()
    mask[0] = 0.0
    mask[1] = 1.0
    old = torch.randn(B, T, generator=gen, dtype=torch.float64)
    vpreds = old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    returns = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return vpreds.requires_grad_(True), old, returns, mask


def ref_value_loss(v, old, ret, mask, c, mode):
    rows, clipped, n, vsum = [], 0, 0, 0.0
    for i in range(B):
        row = []
        for t in range(T):
            if mask[i, t] == 0:
                continue
            vc = torch.clamp(v[i, t], old[i, t] - c, old[i, t] + c)
            a, b = (v[i, t] - ret[i, t]) ** 2, (vc - ret[i, t]) ** 2
            clipped += int(abs(float(v[i, t].detach() - old[i, t])) > c and b > a)
            n += 1
            vsum += float(v[i, t].detach())
            row.append(0.5 * torch.maximum(a, b))
        rows.append(row)
    if mode == "token-mean":
        flat = [x for r in rows for x in r]
        loss = sum(flat) / len(flat)
    else:
        per = [sum(r) / len(r) if mode == "seq-mean-token-mean" else sum(r) for r in rows if r]
        loss = sum(per) / len(per)
    return loss, clipped / n, vsum / n


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_value_loss_matches_reference(mode: str) -> None:
    v, old, ret, mask = value_inputs(1)
    loss, m = value_loss(v, old, ret, mask, 0.2, mode)
    want, clipfrac, vmean = ref_value_loss(v, old, ret, mask, 0.2, mode)
    torch.testing.assert_close(loss, want)
    (g_got,) = torch.autograd.grad(loss, v)
    (g_want,) = torch.autograd.grad(want, v)
    torch.testing.assert_close(g_got, g_want)
    assert 0 < clipfrac < 1
    assert m["vf_clipfrac"].item() == pytest.approx(clipfrac)
    assert m["vpred_mean"].item() == pytest.approx(vmean)
    assert all(x.dim() == 0 and not x.requires_grad for x in m.values())


def test_value_loss_split_with_global_normalizer() -> None:
    v, old, ret, mask = value_inputs(2)
    mode = "token-mean"
    full, _ = value_loss(v, old, ret, mask, 0.2, mode)
    chunks = [(0, 3), (3, 4), (4, 6)]
    count = sum(agg_normalizer(mask[a:b], mode) for a, b in chunks)
    split = sum(value_loss(v[a:b], old[a:b], ret[a:b], mask[a:b], 0.2, mode, normalizer=count)[0]
                for a, b in chunks)
    torch.testing.assert_close(split, full)


def test_value_loss_unknown_mode() -> None:
    v, old, ret, mask = value_inputs(3)
    with pytest.raises(ValueError, match="token-mean"):
        value_loss(v, old, ret, mask, 0.2, "mean")
