"""policy_loss (ppo, gspo, gspo_token) and kl_penalty against slow float64 loop references."""

import math

import pytest
import torch

from megatron_gad.losses import (
    KL_KINDS,
    LOSS_AGG_MODES,
    POLICY_LOSS_MODES,
    agg_normalizer,
    kl_penalty,
    policy_loss,
)

B, T = 6, 8


def random_mask(gen: torch.Generator) -> torch.Tensor:
    """Random holes, ragged lengths, one fully masked row (0) and one full row (1)."""
    mask = (torch.rand(B, T, generator=gen) < 0.7).double()
    mask[0] = 0.0
    mask[1] = 1.0
    mask[2] = 0.0
    mask[2, :2] = 1.0
    return mask


def random_inputs(seed: int, spread: float, const_adv: bool = False):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp = (old + spread * torch.randn(B, T, generator=gen, dtype=torch.float64))
    if const_adv:
        adv = torch.randn(B, 1, generator=gen, dtype=torch.float64).expand(B, T).clone()
    else:
        adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return logp.requires_grad_(True), old, adv, mask


def ref_agg(rows: list[list[torch.Tensor]], mode: str) -> torch.Tensor:
    if mode == "token-mean":
        flat = [x for row in rows for x in row]
        return sum(flat) / len(flat)
    per_seq = [sum(r) / len(r) if mode == "seq-mean-token-mean" else sum(r) for r in rows if r]
    return sum(per_seq) / len(per_seq)


def clip(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.clamp(x, lo, hi)


def ref_ppo(logp, old, adv, mask, low, high, mode, c=None):
    rows, clipped, lower, n = [], 0, 0, 0
    for i in range(B):
        row = []
        for t in range(T):
            if mask[i, t] == 0:
                continue
            a = adv[i, t]
            r = torch.exp(logp[i, t] - old[i, t])
            l1, l2 = -a * r, -a * clip(r, 1 - low, 1 + high)
            loss = torch.maximum(l1, l2)
            clipped += int(l2 > l1)
            if c is not None and a < 0:
                lower += int(loss > -a * c)
                loss = torch.minimum(loss, -a * c)
            row.append(loss)
            n += 1
        rows.append(row)
    return ref_agg(rows, mode), clipped / n, lower / n


def ref_gspo(logp, old, adv, mask, low, high, mode):
    rows, clipped, nseq = [], 0, 0
    for i in range(B):
        idx = [t for t in range(T) if mask[i, t] > 0]
        if not idx:
            rows.append([])
            continue
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in idx) / len(idx))
        a = sum(adv[i, t] for t in idx) / len(idx)
        l1, l2 = -a * s, -a * clip(s, 1 - low, 1 + high)
        clipped += int(l2 > l1)
        nseq += 1
        rows.append([torch.maximum(l1, l2)] * len(idx))
    return ref_agg(rows, mode), clipped / nseq


def ref_gspo_token(logp, old, adv, mask, low, high, mode):
    rows, clipped, n = [], 0, 0
    for i in range(B):
        idx = [t for t in range(T) if mask[i, t] > 0]
        row = []
        if idx:
            seq = (sum(logp[i, t] - old[i, t] for t in idx) / len(idx)).detach()
        for t in idx:
            s = torch.exp(logp[i, t] - logp[i, t].detach() + seq)
            l1, l2 = -adv[i, t] * s, -adv[i, t] * clip(s, 1 - low, 1 + high)
            clipped += int(l2 > l1)
            n += 1
            row.append(torch.maximum(l1, l2))
        rows.append(row)
    return ref_agg(rows, mode), clipped / n


def grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, x)[0]


def ppo_kl_ref(logp, old, mask) -> float:
    vals = [float(old[i, t] - logp[i, t].detach()) for i in range(B) for t in range(T) if mask[i, t] > 0]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_matches_reference(agg: str, dual) -> None:
    logp, old, adv, mask = random_inputs(10, spread=0.4)
    if dual is not None:  # make some negative-advantage tokens hit the dual-clip cap
        logp = (logp.detach() + 1.5 * (adv < -0.5)).requires_grad_(True)
    loss, m = policy_loss("ppo", logp, old, adv, mask, 0.2, 0.28, agg, clip_ratio_c=dual)
    want, clipfrac, lower = ref_ppo(logp, old, adv, mask, 0.2, 0.28, agg, dual)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad(loss, logp), grad(want, logp))
    assert 0 < clipfrac < 1
    torch.testing.assert_close(m["pg_clipfrac"], torch.tensor(clipfrac, dtype=torch.float64))
    torch.testing.assert_close(m["pg_clipfrac_lower"], torch.tensor(lower, dtype=torch.float64))
    if dual is not None:
        assert lower > 0
    torch.testing.assert_close(m["ppo_kl"], torch.tensor(ppo_kl_ref(logp, old, mask),
                                                         dtype=torch.float64))
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_matches_reference(agg: str) -> None:
    logp, old, adv, mask = random_inputs(11, spread=0.3)
    loss, m = policy_loss("gspo", logp, old, adv, mask, 0.05, 0.05, agg)
    want, clipfrac = ref_gspo(logp, old, adv, mask, 0.05, 0.05, agg)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad(loss, logp), grad(want, logp))
    assert 0 < clipfrac < 1
    torch.testing.assert_close(m["pg_clipfrac"], torch.tensor(clipfrac, dtype=torch.float64))
    assert m["pg_clipfrac_lower"] == 0


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_token_matches_reference(agg: str) -> None:
    logp, old, adv, mask = random_inputs(12, spread=0.3)
    loss, m = policy_loss("gspo_token", logp, old, adv, mask, 0.05, 0.05, agg)
    want, clipfrac = ref_gspo_token(logp, old, adv, mask, 0.05, 0.05, agg)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad(loss, logp), grad(want, logp))
    assert 0 < clipfrac < 1
    torch.testing.assert_close(m["pg_clipfrac"], torch.tensor(clipfrac, dtype=torch.float64))


def test_gspo_gradient_is_the_analytical_sequence_gradient() -> None:
    """Unclipped rows: dL/dlogp_it = -(A_i s_i / |y_i|) / N; clipped rows: exactly 0."""
    gen = torch.Generator().manual_seed(13)
    lengths = [5, 3, 8, 2, 6, 0]
    shift = [0.0, 0.5, -0.5, 0.5, -0.5, 0.0]  # mean log-ratio per row
    seq_adv = [1.3, 0.7, 0.9, -1.1, -0.6, 2.0]
    # A>0 & s>1+h -> clipped; A>0 & s<1-l -> unclipped branch; A<0 & s>1+h -> unclipped;
    # A<0 & s<1-l -> clipped
    expect_clipped = [False, True, False, False, True, False]
    mask = torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    noise = 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
    noise = noise - (noise.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)) * mask
    logp = (old + noise + torch.tensor(shift, dtype=torch.float64)[:, None]).requires_grad_(True)
    adv = torch.tensor(seq_adv, dtype=torch.float64)[:, None].expand(B, T)
    low, high = 3e-4, 4e-4
    loss, m = policy_loss("gspo", logp, old, adv, mask, low, high, "seq-mean-token-mean")
    g = grad(loss, logp)
    num_seqs = sum(1 for n in lengths if n > 0)
    for i, n in enumerate(lengths):
        if n == 0:
            assert torch.all(g[i] == 0)
            continue
        s = math.exp(shift[i])
        expected = 0.0 if expect_clipped[i] else -(seq_adv[i] * s / n) / num_seqs
        torch.testing.assert_close(g[i, :n], torch.full((n,), expected, dtype=torch.float64))
        assert torch.all(g[i, n:] == 0)
    assert m["pg_clipfrac"] == pytest.approx(2 / num_seqs)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_and_gspo_token_agree_for_sequence_constant_advantages(agg: str) -> None:
    logp, old, adv, mask = random_inputs(14, spread=0.3, const_adv=True)
    seq_loss, _ = policy_loss("gspo", logp, old, adv, mask, 0.05, 0.05, agg)
    tok_loss, _ = policy_loss("gspo_token", logp, old, adv, mask, 0.05, 0.05, agg)
    seq_grad, tok_grad = grad(seq_loss, logp), grad(tok_loss, logp)
    torch.testing.assert_close(seq_loss, tok_loss)
    torch.testing.assert_close(seq_grad, tok_grad)
    # and both differ from vanilla token-level PPO on the same inputs (the test can fail)
    ppo_loss, _ = policy_loss("ppo", logp, old, adv, mask, 0.05, 0.05, agg)
    assert not torch.allclose(grad(ppo_loss, logp), seq_grad)


@pytest.mark.parametrize("mode", POLICY_LOSS_MODES)
def test_policy_loss_split_with_global_normalizer(mode: str) -> None:
    logp, old, adv, mask = random_inputs(15, spread=0.3)
    agg = "seq-mean-token-mean"
    full, _ = policy_loss(mode, logp, old, adv, mask, 0.1, 0.1, agg)
    chunks = [(0, 1), (1, 4), (4, 6)]
    count = sum(agg_normalizer(mask[a:b], agg) for a, b in chunks)
    split = sum(policy_loss(mode, logp[a:b], old[a:b], adv[a:b], mask[a:b], 0.1, 0.1, agg,
                            normalizer=count)[0] for a, b in chunks)
    torch.testing.assert_close(split, full)
    torch.testing.assert_close(grad(split, logp), grad(full, logp))


@pytest.mark.parametrize("mode", ["gspo", "gspo_token"])
def test_gspo_rejects_seq_mean_token_sum(mode: str) -> None:
    logp, old, adv, mask = random_inputs(16, spread=0.1)
    with pytest.raises(ValueError, match="seq-mean-token-sum"):
        policy_loss(mode, logp, old, adv, mask, 0.1, 0.1, "seq-mean-token-sum")
    policy_loss("ppo", logp, old, adv, mask, 0.1, 0.1, "seq-mean-token-sum")  # fine for ppo


def test_gspo_extreme_ratio_is_finite() -> None:
    logp, old, adv, mask = random_inputs(17, spread=0.1)
    logp = (logp.detach() + 50.0).requires_grad_(True)
    for mode in ("gspo", "gspo_token", "ppo"):
        loss, _ = policy_loss(mode, logp, old, adv, mask, 0.2, 0.2, "token-mean")
        assert torch.isfinite(loss) and torch.isfinite(grad(loss, logp)).all()


def test_dual_clip_must_exceed_one() -> None:
    logp, old, adv, mask = random_inputs(18, spread=0.1)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss("ppo", logp, old, adv, mask, 0.2, 0.2, "token-mean", clip_ratio_c=0.9)


def test_unknown_names_list_the_valid_ones() -> None:
    logp, old, adv, mask = random_inputs(19, spread=0.1)
    with pytest.raises(ValueError) as err:
        policy_loss("grpo", logp, old, adv, mask, 0.2, 0.2, "token-mean")
    assert "'grpo'" in str(err.value) and all(m in str(err.value) for m in POLICY_LOSS_MODES)
    with pytest.raises(ValueError) as err:
        policy_loss("ppo", logp, old, adv, mask, 0.2, 0.2, "sum")
    assert "'sum'" in str(err.value) and all(m in str(err.value) for m in LOSS_AGG_MODES)
    with pytest.raises(ValueError) as err:
        kl_penalty(logp, old, "k9")
    assert "'k9'" in str(err.value) and all(k in str(err.value) for k in KL_KINDS)


def ref_kl(lp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    d = lp - ref
    if kind == "kl":
        return d
    if kind == "abs":
        return torch.abs(d)
    if kind == "mse":
        return 0.5 * d * d
    return torch.clamp(torch.exp(-d) + d - 1, -10, 10)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty_matches_reference(kind: str) -> None:
    gen = torch.Generator().manual_seed(20)
    lp = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    got = kl_penalty(lp, ref, kind)
    want = torch.stack([torch.stack([ref_kl(lp[i, t], ref[i, t], kind) for t in range(5)])
                        for i in range(3)])
    torch.testing.assert_close(got, want)
    weights = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(grad((got * weights).sum(), lp), grad((want * weights).sum(), lp))


def test_low_var_kl_is_clamped_and_finite_for_huge_gaps() -> None:
    lp = torch.tensor([0.0, -500.0, 500.0], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(3, dtype=torch.float64)
    kl = kl_penalty(lp, ref, "low_var_kl")
    assert kl[0] == 0 and kl[1] == 10 and 0 < kl[2] <= 10
    assert torch.isfinite(grad(kl.sum(), lp)).all()
