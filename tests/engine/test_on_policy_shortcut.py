"""The on-policy shortcut (``ActorEngine.update_on_policy``: old log-probs detached from the
training forward, no separate pass) gives the losses, metrics and gradients of the two-pass path
(``compute_log_probs`` then ``update``) at every layout of the engine parity test, and returns
the log-probs and entropy ``compute_log_probs`` would have returned, in the batch's row order.

Reuses the data, model and settings of ``test_engine_parity.py`` (uneven response lengths per
DP half, an empty response, a KL loss to the reference and an entropy bonus); rows are shuffled
before the update, so the returned log-probs must be put back in order.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

from megatron_gad.runtime.spawn import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _parity_module():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_engine_parity.py")
    spec = importlib.util.spec_from_file_location("engine_parity_machinery", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = _parity_module()
SEED = 7


def both_paths(data: dict, ckpt: str, micro: int) -> dict:
    """Per rank: the two-pass update, then (same weights, reloaded) the shortcut."""
    from megatron.core import parallel_state as ps

    from megatron_gad.checkpoint import load_model, save_model
    from megatron_gad.engine import ActorEngine, PolicyBatch, SequenceBatch
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cfg = transformer_config_from_hf(parity.hf_config(), tp=tp, pp=pp)
    actor_cfg, _, optim = parity.settings(micro)
    actor_cfg = dataclasses.replace(actor_cfg, shuffle=True, ppo_epochs=1)
    actor = ActorEngine.create(cfg, model_args_from_hf(parity.hf_config()), actor_cfg, optim)
    save_model(actor.chunks, ckpt)
    share = parity.ROWS // dp
    d = parity.rows_of(data, dp_rank * share, (dp_rank + 1) * share)
    student = SequenceBatch.from_ids(**d["student"])
    out = {"dp_rank": dp_rank}
    log_probs, entropy = actor.compute_log_probs(student, parity.TEMP, micro_batch_size=micro)
    out["two_metrics"] = actor.update(PolicyBatch(student, log_probs, d["advantages"], d["ref_log_probs"]),
                                      temperature=parity.TEMP, shuffle_seed=SEED)
    out["two_grads"], _ = parity.grads_and_params(actor)
    out["log_probs"], out["entropy"] = log_probs, entropy
    load_model(actor.chunks, ckpt)
    with pytest.raises(ValueError, match="old_log_probs=None"):
        actor.update_on_policy(PolicyBatch(student, log_probs, d["advantages"]), temperature=parity.TEMP)
    out["one_metrics"], out["one_log_probs"], out["one_entropy"] = actor.update_on_policy(
        PolicyBatch(student, None, d["advantages"], d["ref_log_probs"]), temperature=parity.TEMP, shuffle_seed=SEED)
    out["one_grads"], _ = parity.grads_and_params(actor)
    return out


@pytest.mark.parametrize("tp,pp,world,micro", parity.LAYOUTS,
                         ids=[f"tp{t}-pp{p}-dp{w // (t * p)}-mb{m}" for t, p, w, m in parity.LAYOUTS])
def test_shortcut_matches_two_passes(tmp_path, tp: int, pp: int, world: int, micro: int) -> None:
    results = run_distributed(both_paths, world, tp=tp, pp=pp, args=(parity.make_data(), str(tmp_path), micro),
                              timeout_s=240)
    valid = torch.tensor(parity.RESP_LENS)[:, None] > torch.arange(parity.R)[None]
    for r in results:
        share = parity.ROWS // (world // (tp * pp))
        rows = valid[r["dp_rank"] * share:(r["dp_rank"] + 1) * share]
        two, one = r["two_metrics"], r["one_metrics"]
        assert set(two) == set(one)
        assert two["actor/grad_norm"] > 1e-3 and two["actor/kl_loss"] > 0.0, "vacuous: no gradient / no KL"
        for name in two:
            assert abs(two[name] - one[name]) <= parity.TOL * max(1.0, abs(two[name])), (name, two[name], one[name])
        assert set(r["two_grads"]) == set(r["one_grads"]) and r["two_grads"]
        for name, g in r["two_grads"].items():
            diff = (g - r["one_grads"][name]).abs().max().item()
            assert diff <= parity.TOL, f"{name}: gradients differ by {diff:.1e}"
        assert r["log_probs"][rows].abs().min() > 0.0, "vacuous: valid log-probs should be non-zero"
        assert torch.allclose(r["one_log_probs"][rows], r["log_probs"][rows], atol=parity.TOL, rtol=0)
        assert torch.allclose(r["one_entropy"][rows], r["entropy"][rows], atol=parity.TOL, rtol=0)
