"""Actor and critic engines give the same losses, gradients and updates at every layout.

One spawned run per layout builds both engines, loads the reference checkpoint and runs, through
Megatron's pipeline schedule: actor log-probs (forward-only), one actor GSPO step (+ entropy bonus
and low-var KL to a reference), critic scores and values (forward-only), one discriminator step
and one value step (token-mean). The reference is one process with ONE micro-batch; the layouts are
TP=1 with 4 micro-batches, TP=2, PP=2, TP=2 x PP=2 and DP=2 (2 micro-batches each where possible).

Count-based metrics (the clip fractions and ``critic/d_acc``) are exact ratios of integer counts
and are compared as counts: every layout must count every token, sequence and pair alike
(``COUNT_UNITS``). ``test_clip_decisions_are_away_from_ties`` checks that no clip decision of the
first policy step or of the value step is within rounding reach of its boundary, so a count can
only differ through a real bug.

The rows are built so that a LOCAL normaliser would be wrong: response lengths are short on the
first data-parallel half and long on the second, and one response is empty (so the number of
non-empty sequences differs between micro-batches); ``test_data_is_sensitive_to_the_normaliser``
proves that on the losses themselves.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_gad.runtime.spawn import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

VOCAB, P, R, RT, TEMP, ROWS = 200, 4, 6, 5, 0.8, 8
PROMPT_LENS = [4, 2, 3, 4, 1, 4, 2, 3]
RESP_LENS = [1, 2, 0, 1, 6, 5, 6, 4]  # short on DP rank 0, long on DP rank 1, one empty
TEACHER_LENS = [5, 3, 4, 2, 5, 1, 3, 4]
LAYOUTS = [(1, 1, 1, 2), (2, 1, 2, 2), (1, 2, 2, 2), (2, 2, 4, 2), (1, 1, 2, 2)]  # tp, pp, world, micro rows
TOL = 2e-5


def hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, rms_norm_eps=1e-6)


def sequences(g: torch.Generator, resp_lens: list[int], width: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (ROWS, P + width), generator=g)
    mask = torch.zeros(ROWS, P + width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(PROMPT_LENS, resp_lens)):
        mask[i, P - p:P + r] = 1
    return {"input_ids": ids * mask, "attention_mask": mask, "response_mask": mask[:, P:].clone()}


def make_data() -> dict:
    g = torch.Generator().manual_seed(0)
    student, teacher = sequences(g, RESP_LENS, R), sequences(g, TEACHER_LENS, RT)
    old = -5.3 + 0.3 * torch.randn(ROWS, R, generator=g)
    adv = torch.randn(ROWS, 1, generator=g).expand(ROWS, R).clone()
    return {"student": student, "teacher": teacher, "old_log_probs": old, "advantages": adv,
            "ref_log_probs": old + 0.1 * torch.randn(ROWS, R, generator=g),
            "old_values": 0.5 * torch.randn(ROWS, R, generator=g), "returns": torch.randn(ROWS, R, generator=g)}


def rows_of(data: dict, lo: int, hi: int) -> dict:
    return {k: rows_of(v, lo, hi) if isinstance(v, dict) else v[lo:hi] for k, v in data.items()}


def settings(micro: int):
    from megatron_gad.engine import ActorConfig, CriticLossConfig
    from megatron_gad.models.build import OptimConfig

    # clip_grad far above the norm: main_grad stays unscaled, so it can be compared after the step.
    optim = OptimConfig(lr=1e-3, eps=1e-6, clip_grad=1e6)
    actor = ActorConfig(policy_loss="gspo", loss_agg_mode="seq-mean-token-mean", clip_ratio=0.05,
                        entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl",
                        ppo_micro_batch_size_per_gpu=micro, optim=optim)
    critic = CriticLossConfig(ppo_micro_batch_size_per_gpu=micro, cliprange_value=0.2, loss_agg_mode="token-mean")
    return actor, critic, optim


def grads_and_params(engine) -> tuple[dict, dict]:
    from megatron_gad.models.sharding import full_tensors

    grads = dict(full_tensors(engine.chunks[0], select=lambda p: p.main_grad.clone()))
    return grads, dict(full_tensors(engine.chunks[0]))


def randomise_head(critic) -> None:
    """Give the critic a seeded random score head (the same on every rank): the zero head it is
    built with scores every sequence alike and sends no gradient to the trunk, which would make
    the critic's parity checks trivially true."""
    from megatron_gad.models.sharding import unwrap

    head = unwrap(critic.chunks[0]).head
    if head is not None:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            head.score.weight.copy_(torch.randn(head.score.weight.shape, generator=g) * 0.02)


def run_layout(data: dict, ckpt: str, save: bool, micro: int) -> dict:
    """Per rank: both engines, every engine call; returns what the parent compares."""
    from megatron.core import parallel_state as ps

    from megatron_gad.checkpoint import load_model, save_model
    from megatron_gad.engine import ActorEngine, CriticEngine, PairBatch, PolicyBatch, SequenceBatch, SftBatch, ValueBatch
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cfg, args = transformer_config_from_hf(hf_config(), tp=tp, pp=pp), model_args_from_hf(hf_config())
    actor_cfg, critic_cfg, optim = settings(micro)
    actor = ActorEngine.create(cfg, args, actor_cfg, optim)
    critic = CriticEngine.create(cfg, args, critic_cfg, optim)
    if save:
        randomise_head(critic)
    for engine, name in ((actor, "actor"), (critic, "critic")):
        (save_model if save else load_model)(engine.chunks, f"{ckpt}/{name}")
    frozen = ActorEngine.create(cfg, args, actor_cfg)  # reference policy: no optimizer, no DDP
    load_model(frozen.chunks, f"{ckpt}/actor")
    share = ROWS // dp
    d = rows_of(data, dp_rank * share, (dp_rank + 1) * share)
    student, teacher = (SequenceBatch.from_ids(**d[k]) for k in ("student", "teacher"))
    out = {"dp_rank": dp_rank}
    out["log_probs"], out["entropy"] = actor.compute_log_probs(student, TEMP, micro_batch_size=micro)
    out["frozen_log_probs"], _ = frozen.compute_log_probs(student, TEMP, micro_batch_size=micro)
    out["actor_metrics"] = actor.update(
        PolicyBatch(student, d["old_log_probs"], d["advantages"], d["ref_log_probs"]), temperature=TEMP)
    out["actor_grads"], _ = grads_and_params(actor)
    # PPO, token-mean (uneven token counts per micro-batch / DP rank), 2 epochs = 2 optimizer steps.
    actor.settings = dataclasses.replace(actor.settings, policy_loss="ppo", loss_agg_mode="token-mean",
                                         clip_ratio=0.2, ppo_epochs=2, use_kl_loss=False)
    out["ppo_metrics"] = actor.update(PolicyBatch(student, d["old_log_probs"], d["advantages"]), temperature=TEMP)
    out["ppo_grads"], _ = grads_and_params(actor)
    sft = SftBatch(teacher.input_ids, teacher.attention_mask, teacher.position_ids,
                   torch.cat([torch.zeros_like(teacher.input_ids[:, :P]), teacher.response_mask], dim=1))
    out["sft_metrics"] = actor.sft_update(sft, micro_batch_size=micro)
    out["sft_grads"], out["actor_params"] = grads_and_params(actor)
    out["scores"] = critic.compute_scores(student, micro_batch_size=micro)
    out["values"] = critic.compute_values(student, micro_batch_size=micro)
    out["d_metrics"] = critic.update_discriminator(PairBatch(student, teacher))
    out["d_grads"], _ = grads_and_params(critic)
    out["values_after_d"] = critic.compute_values(student, micro_batch_size=micro)  # the value step's v
    out["v_metrics"] = critic.update_values(ValueBatch(student, d["old_values"], d["returns"]))
    out["v_grads"], out["critic_params"] = grads_and_params(critic)
    return out


TENSOR_KEYS = ("log_probs", "frozen_log_probs", "entropy", "scores", "values", "values_after_d")
NAMED_KEYS = ("actor_grads", "ppo_grads", "sft_grads", "actor_params", "d_grads", "v_grads", "critic_params")
METRIC_KEYS = ("actor_metrics", "ppo_metrics", "sft_metrics", "d_metrics", "v_metrics")
TOKENS, SEQUENCES = sum(RESP_LENS), sum(1 for n in RESP_LENS if n > 0)
# Count-based metrics and the number of units (tokens, sequences, half points of pairs) each
# fraction is taken over, times the epochs it is averaged over: |difference| * units = the number
# of units counted differently, which must be 0.
COUNT_UNITS = {
    ("actor_metrics", "actor/pg_clipfrac"): SEQUENCES,  # GSPO: one clip decision per sequence
    ("actor_metrics", "actor/pg_clipfrac_lower"): TOKENS,
    ("ppo_metrics", "actor/pg_clipfrac"): 2 * TOKENS,  # PPO: per token, mean over 2 epochs
    ("ppo_metrics", "actor/pg_clipfrac_lower"): 2 * TOKENS,
    ("d_metrics", "critic/d_acc"): 2 * ROWS,  # 2 points per won pair, 1 per tie
    ("v_metrics", "critic/vf_clipfrac"): TOKENS,
}


def merge(results: list[dict]) -> dict:
    """Per-row tensors in DP order (every rank must hold its replica's values), named tensors by
    global name (replicas must agree), metrics (every rank must report the same floats)."""
    merged: dict = {k: {} for k in NAMED_KEYS}
    for key in TENSOR_KEYS:
        by_dp: dict[int, torch.Tensor] = {}
        for r in results:
            if r["dp_rank"] in by_dp:
                assert torch.equal(by_dp[r["dp_rank"]], r[key]), f"{key}: ranks of one replica differ"
            by_dp[r["dp_rank"]] = r[key]
        merged[key] = torch.cat([by_dp[i] for i in sorted(by_dp)])
    for key in NAMED_KEYS:
        for r in results:
            for name, t in r[key].items():
                if name in merged[key]:
                    assert (merged[key][name] - t).abs().max() <= TOL, f"{key} {name}: replicas differ"
                merged[key][name] = t
    for key in METRIC_KEYS:
        assert all(r[key] == results[0][key] for r in results), f"{key}: ranks report different metrics"
        merged[key] = results[0][key]
    return merged


def compare(ref: dict, got: dict) -> dict[str, float]:
    """Max abs difference per compared quantity (after asserting the names match). Per-token
    outputs are compared on valid response tokens only: the engines cut columns that are padding
    in every row of a batch (so a DP half of short responses is narrower) and report 0 there."""
    valid = torch.tensor(RESP_LENS)[:, None] > torch.arange(R)[None]
    diffs = {k: ((ref[k] - got[k]) * (valid if ref[k].dim() == 2 else 1)).abs().max().item() for k in TENSOR_KEYS}
    for key in NAMED_KEYS:
        assert set(ref[key]) == set(got[key]), f"{key}: names differ {set(ref[key]) ^ set(got[key])}"
        diffs[key] = max((ref[key][n] - got[key][n]).abs().max().item() for n in ref[key])
    for key in METRIC_KEYS:
        assert set(ref[key]) == set(got[key])
        diffs[key] = max(abs(ref[key][m] - got[key][m]) / max(1.0, abs(ref[key][m])) for m in ref[key]
                         if (key, m) not in COUNT_UNITS)
    for (key, m), units in COUNT_UNITS.items():
        diffs[f"{m} ({key}) units counted differently"] = abs(ref[key][m] - got[key][m]) * units
    return diffs


def count_mismatches(diffs: dict[str, float]) -> dict[str, float]:
    """Count metrics must agree exactly (ratios of the same integers are the same floats)."""
    return {k: v for k, v in diffs.items() if "counted differently" in k and v != 0.0}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, str]:
    ckpt = str(tmp_path_factory.mktemp("engine_ckpt"))
    ref = merge(run_distributed(run_layout, 1, args=(make_data(), ckpt, True, ROWS), timeout_s=120))
    return ref, ckpt


def test_reference_is_not_vacuous(reference) -> None:
    ref, _ = reference
    assert torch.equal(ref["frozen_log_probs"], ref["log_probs"])
    m = ref["actor_metrics"]
    assert 0.0 < m["actor/pg_clipfrac"] < 1.0, "some but not all sequences should be clipped"
    assert 0.0 < ref["ppo_metrics"]["actor/pg_clipfrac"] < 1.0
    assert ref["sft_metrics"]["actor/sft_loss"] > 1.0 and ref["sft_metrics"]["actor/grad_norm"] > 1e-3
    for key in ("actor_grads", "ppo_grads", "sft_grads"):
        assert ref[key]["output_layer.weight"][VOCAB:].abs().max() == 0.0, f"{key}: vocab padding got a gradient"
    assert m["actor/grad_norm"] > 1e-3 and ref["d_metrics"]["critic/grad_norm"] > 1e-3
    assert ref["scores"].std() > 1e-3, "the critic's scores should differ between sequences"
    trunk = [g for n, g in ref["d_grads"].items() if n.startswith("trunk.decoder.layers.")]
    assert trunk and max(float(g.abs().max()) for g in trunk) > 0, "the trunk should get a gradient"
    assert set(ref["d_metrics"]) == {"critic/d_loss", "critic/d_acc", "critic/student_value_mean",
                                     "critic/teacher_value_mean", "critic/grad_norm", "critic/lr", "critic/update_skipped"}
    assert {"critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean"} <= set(ref["v_metrics"])
    assert {"actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/kl_loss",
            "actor/grad_norm", "actor/lr"} <= set(m)


@pytest.mark.parametrize("tp,pp,world,micro", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{w // (t * p)}-mb{m}" for t, p, w, m in LAYOUTS])
def test_layout_matches_reference(reference, tp: int, pp: int, world: int, micro: int) -> None:
    ref, ckpt = reference
    got = merge(run_distributed(run_layout, world, tp=tp, pp=pp, args=(make_data(), ckpt, False, micro), timeout_s=240))
    diffs = compare(ref, got)
    print(f"\nmax abs diff tp={tp} pp={pp} dp={world // (tp * pp)} micro={micro}: "
          + ", ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
    bad = {k: v for k, v in diffs.items() if v > TOL and "counted differently" not in k}
    assert not bad, f"layout differs from the single-process reference: {bad}"
    assert not count_mismatches(diffs), f"layout counts differently from the reference: {count_mismatches(diffs)}"


def test_clip_decisions_are_away_from_ties(reference) -> None:
    """The inputs keep every clip decision of the first GSPO step and of the value step at least
    1e-4 from its boundary, far beyond the ~1e-7 differences between layouts, and every
    discriminator pair is decided (no exact tie). The PPO step runs on the weights after the GSPO
    step and its second epoch after one more step; its ratios are not observable from outside the
    engine, so its counts are checked by the parity alone (with these seeds they agree)."""
    ref, _ = reference
    d = make_data()
    valid = d["student"]["response_mask"].bool()
    lengths = valid.sum(-1)
    seq_log_ratio = ((ref["log_probs"] - d["old_log_probs"]) * valid).sum(-1) / lengths.clamp(min=1)
    ratio = seq_log_ratio.exp()[lengths > 0]
    assert torch.minimum((ratio - 0.95).abs(), (ratio - 1.05).abs()).min() > 1e-4
    step = (ref["values_after_d"] - d["old_values"]).abs()[valid]
    assert (step - 0.2).abs().min() > 1e-4
    clipped_v = (d["old_values"] + (ref["values_after_d"] - d["old_values"]).clamp(-0.2, 0.2))[valid]
    gap = ((clipped_v - d["returns"][valid]).square() - (ref["values_after_d"][valid] - d["returns"][valid]).square())
    assert gap[step > 0.2].abs().min() > 1e-4, "an active value clip is a near-tie between its two terms"
    assert 0.0 < ref["v_metrics"]["critic/vf_clipfrac"] < 1.0


def test_log_probs_equal_a_direct_float64_reference(reference) -> None:
    """Engine log-probs / entropy / scores equal a direct full forward + float64 log-softmax."""
    ref, ckpt = reference
    direct = run_distributed(direct_forward, 1, args=(make_data(), ckpt), timeout_s=120)[0]
    mask = torch.tensor(RESP_LENS)[:, None] > torch.arange(R)[None]
    lp_diff = ((ref["log_probs"].double() - direct["log_probs"]) * mask).abs().max().item()
    ent_diff = ((ref["entropy"].double() - direct["entropy"]) * mask).abs().max().item()
    score_diff = (ref["scores"].double() - direct["scores"]).abs().max().item()
    frozen_diff = ((direct["frozen_log_probs"].double() - direct["log_probs"]) * mask).abs().max().item()
    print(f"\nengine vs direct float64: log_probs {lp_diff:.1e}, entropy {ent_diff:.1e}, scores {score_diff:.1e}, "
          f"frozen engine log_probs {frozen_diff:.1e}")
    assert lp_diff < 1e-5 and ent_diff < 1e-5 and score_diff < 1e-5 and frozen_diff < 1e-5


def direct_forward(data: dict, ckpt: str) -> dict:
    """TP=1 model forward without the schedule; log-softmax over the real vocab in float64."""
    from megatron_gad.checkpoint import load_model
    from megatron_gad.engine import ActorEngine, CriticEngine, PolicyBatch, SequenceBatch, ValueBatch
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.inputs import attention_mask_4d, position_ids_from_mask
    from megatron_gad.models.sharding import unwrap

    cfg, args = transformer_config_from_hf(hf_config()), model_args_from_hf(hf_config())
    actor, critic = ActorEngine.create(cfg, args), CriticEngine.create(cfg, args)
    load_model(actor.chunks, f"{ckpt}/actor")
    load_model(critic.chunks, f"{ckpt}/critic")
    seq = SequenceBatch.from_ids(**data["student"])
    with pytest.raises(RuntimeError, match="without an optimizer"):
        critic.update_values(ValueBatch(seq, data["old_values"], data["returns"]))
    with pytest.raises(RuntimeError, match="without an optimizer"):
        actor.update(PolicyBatch(seq, data["old_log_probs"], data["advantages"]), temperature=TEMP)
    s = data["student"]
    kw = dict(input_ids=s["input_ids"], position_ids=position_ids_from_mask(s["attention_mask"]),
              attention_mask=attention_mask_4d(s["attention_mask"]))
    frozen_lp, _ = actor.compute_log_probs(seq, TEMP, micro_batch_size=4)  # frozen engine, no DDP
    assert not any(p.requires_grad for p in actor.chunks[0].parameters())
    with torch.no_grad():
        logits = unwrap(actor.chunks[0])(**kw).double()[:, P - 1:-1, :VOCAB] / TEMP
        token_scores = unwrap(critic.chunks[0])(**kw).double()
    logp = torch.log_softmax(logits, -1)
    lengths = s["response_mask"].sum(-1)
    return {"log_probs": logp.gather(-1, s["input_ids"][:, P:, None]).squeeze(-1),
            "entropy": -(logp.exp() * logp).sum(-1), "frozen_log_probs": frozen_lp,
            "scores": token_scores[torch.arange(ROWS), P - 1 + lengths]}


def test_data_is_sensitive_to_the_normaliser(reference) -> None:
    """A per-micro-batch (local) normaliser would change these losses: the parity above is not
    an accident of the data."""
    from megatron_gad.losses import policy_loss, value_loss

    ref, _ = reference
    d = make_data()
    mask = d["student"]["response_mask"].float()
    lp = ref["log_probs"]

    def pg(lo: int, hi: int, normalizer=None) -> float:
        return policy_loss("gspo", lp[lo:hi], d["old_log_probs"][lo:hi], d["advantages"][lo:hi], mask[lo:hi],
                           0.05, 0.05, "seq-mean-token-mean", normalizer=normalizer)[0].item()

    def vf(lo: int, hi: int) -> float:
        return value_loss(ref["values"][lo:hi], d["old_values"][lo:hi], d["returns"][lo:hi], mask[lo:hi], 0.2,
                          "token-mean")[0].item()

    pieces = [(i, i + 2) for i in range(0, ROWS, 2)]
    local_pg = sum(pg(lo, hi) for lo, hi in pieces) / len(pieces)  # what Megatron's averaging would give
    global_pg = sum(pg(lo, hi, normalizer=float((mask.sum(-1) > 0).sum())) for lo, hi in pieces)
    assert abs(global_pg - pg(0, ROWS)) < 1e-6
    assert abs(local_pg - global_pg) > 1e-2 * abs(global_pg)
    local_vf = sum(vf(lo, hi) for lo, hi in pieces) / len(pieces)
    assert abs(local_vf - vf(0, ROWS)) > 1e-2 * abs(vf(0, ROWS))


def test_mini_batches_epochs_and_shuffle_take_one_step_each(reference) -> None:
    """4 optimizer steps (2 mini-batches x 2 epochs, rows shuffled per epoch): finite metrics
    averaged over the steps, lr reported, weights moved from the checkpoint."""
    _, ckpt = reference
    out = run_distributed(_multi_step, 1, args=(make_data(), ckpt), timeout_s=120)[0]
    assert out["steps"] == 4 and out["moved"] > 1e-4
    assert all(v == v and abs(v) < 1e6 for v in out["metrics"].values()) and out["metrics"]["actor/lr"] == 1e-3


def _multi_step(data: dict, ckpt: str) -> dict:
    import math

    from megatron_gad.checkpoint import load_model
    from megatron_gad.engine import ActorEngine, PolicyBatch, SequenceBatch
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf

    cfg, args = transformer_config_from_hf(hf_config()), model_args_from_hf(hf_config())
    actor_cfg, _, optim = settings(2)
    actor_cfg = dataclasses.replace(actor_cfg, ppo_epochs=2, shuffle=True)
    actor = ActorEngine.create(cfg, args, actor_cfg, optim)
    load_model(actor.chunks, f"{ckpt}/actor")
    before = [p.detach().clone() for p in actor.chunks[0].parameters()]
    steps = 0
    step_once = actor.optimizer_step

    def counted() -> dict:
        nonlocal steps
        steps += 1
        return step_once()

    actor.optimizer_step = counted  # count the real steps taken
    seq = SequenceBatch.from_ids(**data["student"])
    metrics = actor.update(PolicyBatch(seq, data["old_log_probs"], data["advantages"], data["ref_log_probs"]),
                           temperature=TEMP, mini_batch_size=4)
    moved = max((p - b).abs().max().item() for p, b in zip(actor.chunks[0].parameters(), before))
    assert not any(math.isnan(v) for v in metrics.values())
    return {"steps": steps, "moved": moved, "metrics": metrics}


def _nonfinite_step(data: dict) -> dict:
    """Per rank: a policy step whose loss is NaN must leave the weights as they were."""
    from megatron_gad.engine import ActorEngine, PolicyBatch, SequenceBatch
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.runtime import parallel_info

    info = parallel_info()
    cfg = transformer_config_from_hf(hf_config(), tp=info.tp, pp=info.pp)
    actor_cfg, _, optim = settings(2)
    actor = ActorEngine.create(cfg, model_args_from_hf(hf_config()), actor_cfg, optim)
    before = [p.detach().clone() for p in actor.chunks[0].parameters()]
    advantages = torch.full_like(data["advantages"], float("nan"))
    seq = SequenceBatch.from_ids(**data["student"])
    metrics = actor.update(PolicyBatch(seq, data["old_log_probs"], advantages, data["ref_log_probs"]), temperature=TEMP)
    unchanged = all(torch.equal(p, b) for p, b in zip(actor.chunks[0].parameters(), before))
    return {"metrics": metrics, "unchanged": unchanged}


def test_nonfinite_loss_skips_the_update() -> None:
    """Every rank skips the optimizer step together when the loss is not finite."""
    for rank in run_distributed(_nonfinite_step, 2, tp=2, args=(make_data(),), timeout_s=300):
        assert rank["metrics"]["actor/update_skipped"] == 1.0 and rank["unchanged"]
