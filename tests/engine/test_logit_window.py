"""The actor's output layer inside ``logits_at``: the window's logits and the loss gradients are
those of the full-sequence forward, at TP=1 and across a vocab-parallel TP=2 output layer."""

from __future__ import annotations

import pytest
import torch

from megatron_gad.runtime.spawn import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

VOCAB, P, R, ROWS = 50, 5, 4, 3  # Megatron pads the vocabulary to 128 columns: real and padding shards


def _model_and_inputs():
    from transformers import LlamaConfig

    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.inputs import attention_mask_4d, position_ids_from_mask

    hf = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = build_actor(transformer_config_from_hf(hf, tp=torch.distributed.get_world_size()),
                        model_args_from_hf(hf), True, True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (ROWS, P + R), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[1, P + 2:] = 0  # a short response
    kw = dict(input_ids=ids * mask, position_ids=position_ids_from_mask(mask), attention_mask=attention_mask_4d(mask))
    return model, ids * mask, mask, kw


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def window_against_full() -> dict:
    from megatron_gad.engine.batch import SequenceBatch, SftBatch
    from megatron_gad.engine.forward_step import logit_window, response_log_probs, sft_loss_func
    from megatron_gad.engine.reduce import MetricAccumulator
    from megatron_gad.models.actor import logits_at
    from megatron_gad.models.inputs import position_ids_from_mask

    model, ids, mask, kw = _model_and_inputs()
    seq = SequenceBatch.from_ids(ids, mask, mask[:, P:].clone())
    window = logit_window(seq)
    assert window == (P - 1, P + R - 1)

    def policy_loss(logits):
        lp, ent = response_log_probs(logits, seq, 0.7, VOCAB)
        return (lp * seq.response_mask).sum() + 0.1 * ent.sum(), lp

    full = model(**kw)
    loss_full, lp_full = policy_loss(full)
    loss_full.backward()
    g_full = _grads(model)
    with logits_at(window):
        win = model(**kw)
    loss_win, lp_win = policy_loss(win)
    loss_win.backward()
    g_win = _grads(model)

    # SFT: targets in columns P.. of some rows only, so the window starts inside the sequence
    loss_mask = mask.clone()
    loss_mask[:, :P] = 0
    loss_mask[2, :] = 0
    sft = SftBatch(ids, mask, position_ids_from_mask(mask), loss_mask)
    sft_window = logit_window(sft)
    sft_losses = []
    for ctx in (None, sft_window):
        acc = MetricAccumulator(["actor/sft_loss"])
        with logits_at(ctx):
            logits = model(**kw)
        loss, _ = sft_loss_func(VOCAB, torch.tensor(float(loss_mask[:, 1:].sum())), 1.0, acc, sft, logits)
        loss.backward()
        sft_losses.append((float(loss), _grads(model), logits.shape[1]))
    with pytest.raises(ValueError, match="outside the sequence"):
        with logits_at((0, P + R + 1)):
            model(**kw)
    return {
        "shapes": (tuple(full.shape[:2]), tuple(win.shape[:2])),
        "logit_diff": (win - full[:, P - 1:P + R - 1]).abs().max().item(),
        "lp_diff": (lp_win - lp_full).abs().max().item(), "loss": (float(loss_full), float(loss_win)),
        "grad_diff": max((g_win[n] - g).abs().max().item() for n, g in g_full.items()),
        "grad_names": sorted(g_full) == sorted(g_win), "grad_norm": sum(g.norm().item() for g in g_full.values()),
        "sft_window": sft_window, "sft": [(loss, width) for loss, _, width in sft_losses],
        "sft_grad_diff": max((sft_losses[1][1][n] - g).abs().max().item() for n, g in sft_losses[0][1].items()),
    }


@pytest.mark.parametrize("tp", [1, 2])
def test_windowed_logits_and_gradients_equal_the_full_forward(tp: int) -> None:
    r = run_distributed(window_against_full, tp, tp=tp, timeout_s=180)[0]
    assert r["shapes"] == ((ROWS, P + R), (ROWS, R))
    assert r["logit_diff"] < 1e-5 and r["lp_diff"] < 1e-5
    assert abs(r["loss"][0] - r["loss"][1]) < 1e-5
    assert r["grad_names"] and r["grad_norm"] > 0 and r["grad_diff"] < 1e-5
    # SFT: the window runs from the position before the first target column (P) to before the last
    assert r["sft_window"] == (P - 1, P + R - 1)
    (loss_full, width_full), (loss_win, width_win) = r["sft"]
    assert (width_full, width_win) == (P + R, R) and loss_full > 0
    assert abs(loss_full - loss_win) < 1e-5 and r["sft_grad_diff"] < 1e-5
