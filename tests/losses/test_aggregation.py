"""agg_loss / agg_normalizer against a slow float64 loop reference."""

import pytest
import torch

from megatron_gad.losses import LOSS_AGG_MODES, agg_loss, agg_normalizer

B, T = 6, 7


def random_mask(gen: torch.Generator) -> torch.Tensor:
    """Random 0/1 mask with holes, ragged rows, one fully masked row and one full row."""
    mask = (torch.rand(B, T, generator=gen) < 0.6).double()
    mask[0] = 0.0
    mask[1] = 1.0
    mask[2, 3:] = 0.0
    mask[2, :3] = 1.0
    return mask


def ref_agg(rows: list[list[torch.Tensor]], mode: str) -> torch.Tensor:
    """rows[i] holds the scalar losses of row i's valid tokens, in order."""
    if mode == "token-mean":
        flat = [x for row in rows for x in row]
        return sum(flat) / len(flat)
    per_seq = []
    for row in rows:
        if not row:  # empty rows are skipped entirely
            continue
        total = sum(row)
        per_seq.append(total / len(row) if mode == "seq-mean-token-mean" else total)
    return sum(per_seq) / len(per_seq)


def rows_of(loss: torch.Tensor, mask: torch.Tensor) -> list[list[torch.Tensor]]:
    return [[loss[i, t] for t in range(T) if mask[i, t] > 0] for i in range(B)]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_matches_loop_reference_values_and_grads(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(gen)
    loss = torch.randn(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    got = agg_loss(loss, mask, mode)
    want = ref_agg(rows_of(loss, mask), mode)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, loss)
    (g_want,) = torch.autograd.grad(want, loss)
    torch.testing.assert_close(g_got, g_want)
    assert torch.all(g_got[0] == 0)  # the empty row gets no gradient


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_bool_mask_and_float32(mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    mask = random_mask(gen)
    loss = torch.randn(B, T, generator=gen, dtype=torch.float64)
    want = agg_loss(loss, mask, mode)
    got = agg_loss(loss.float(), mask.bool(), mode)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_agg_normalizer_counts() -> None:
    gen = torch.Generator().manual_seed(2)
    mask = random_mask(gen)
    assert agg_normalizer(mask, "token-mean") == mask.sum()
    nonempty = sum(1 for i in range(B) if mask[i].sum() > 0)
    assert agg_normalizer(mask, "seq-mean-token-mean") == nonempty == B - 1
    assert agg_normalizer(mask.bool(), "seq-mean-token-sum") == nonempty


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_split_with_global_normalizer_equals_unsplit(mode: str) -> None:
    gen = torch.Generator().manual_seed(3)
    mask = random_mask(gen)
    loss = torch.randn(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    full = agg_loss(loss, mask, mode)
    (g_full,) = torch.autograd.grad(full, loss)
    chunks = [(0, 2), (2, 3), (3, 6)]  # uneven micro-batches / DP shards
    global_count = sum(agg_normalizer(mask[a:b], mode) for a, b in chunks)
    split = sum(agg_loss(loss[a:b], mask[a:b], mode, normalizer=global_count) for a, b in chunks)
    (g_split,) = torch.autograd.grad(split, loss)
    torch.testing.assert_close(split, full)
    torch.testing.assert_close(g_split, g_full)
    # a python float normaliser works the same way
    as_float = float(global_count)
    split_f = sum(agg_loss(loss[a:b], mask[a:b], mode, normalizer=as_float) for a, b in chunks)
    torch.testing.assert_close(split_f, full)
    # local normalisers (mean of per-chunk means) give a different loss: layout-dependent
    local = sum(agg_loss(loss[a:b], mask[a:b], mode) for a, b in chunks) / len(chunks)
    assert not torch.allclose(local, full)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_all_empty_batch_is_zero_not_nan(mode: str) -> None:
    loss = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(B, T)
    for normalizer in (None, 0.0, torch.tensor(0)):
        out = agg_loss(loss, mask, mode, normalizer=normalizer)
        (grad,) = torch.autograd.grad(out, loss)
        assert out == 0 and torch.all(grad == 0)


def test_negative_normalizer_rejected() -> None:
    with pytest.raises(ValueError, match="normalizer"):
        agg_loss(torch.ones(2, 3), torch.ones(2, 3), "token-mean", normalizer=-1.0)


def test_unknown_agg_mode_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        agg_loss(torch.ones(2, 3), torch.ones(2, 3), "seq-sum")
    msg = str(err.value)
    assert "'seq-sum'" in msg and all(m in msg for m in LOSS_AGG_MODES)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        agg_normalizer(torch.ones(2, 3), "mean")
