"""Every TP x PP x DP layout gives the single-process forward outputs, gradients and optimizer step.

A one-process reference run builds the model, saves it with dist_checkpointing and takes one
step; each parallel run loads that checkpoint (resharded by megatron-core), runs the same global
batch through Megatron's pipeline schedule (2 micro-batches), reduces gradients with
finalize_model_grads, clips and steps. Outputs, full (TP-gathered) gradients and updated weights
must match to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from megatron_gad.runtime.spawn import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

B, S, VOCAB = 4, 12, 200
TOL = 1e-5
LAYOUTS = [(2, 1, 2), (1, 2, 2), (2, 2, 4), (1, 1, 2)]  # (tp, pp, world): DP = world / (tp*pp)


def tiny_hf_config(arch: str, tied: bool):
    """A 4-layer GQA model of the given architecture (random weights come from Megatron init)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    return cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied, rms_norm_eps=1e-6, **extra,
    )


def make_batch(out_width: int | None):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    shape = (B, S) if out_width is None else (B, S, out_width)
    weights = torch.randn(shape, generator=g, dtype=torch.float64).float()
    return ids, mask, weights


def one_step(role: str, hf_config, ckpt: str, batch, save: bool, num_microbatches: int) -> dict:
    """Per rank: build, load (or save) the checkpoint, one fwd/bwd/step; return full tensors."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gad.checkpoint import load_model, save_model
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.build import OptimConfig, build_model, build_optimizer
    from megatron_gad.models.critic import build_critic
    from megatron_gad.models.inputs import attention_mask_4d, position_ids_from_mask
    from megatron_gad.models.sharding import full_tensors, unwrap

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cfg = transformer_config_from_hf(hf_config, tp=tp, pp=pp)
    args = model_args_from_hf(hf_config)
    builder = build_actor if role == "actor" else build_critic
    chunks = build_model(lambda pre, post: builder(cfg, args, pre, post), cfg)
    head = unwrap(chunks[0]).head if role == "critic" else None
    if head is not None and save:  # the built head is zero: no trunk gradient, equal outputs
        with torch.no_grad():
            head.score.weight.copy_(torch.randn(head.score.weight.shape,
                                                generator=torch.Generator().manual_seed(11)) * 0.02)
    # Adam's first step is ~lr * g / (|g| + eps): with eps=1e-8 a coordinate whose gradient is at
    # float-noise level (1e-10) would move by a noise-determined amount; eps=1e-6 keeps those small.
    optimizer = build_optimizer(chunks, OptimConfig(lr=1e-3, eps=1e-6, clip_grad=1.0), cfg)
    (save_model if save else load_model)(chunks, ckpt)

    ids, mask, weights = (t.chunk(dp)[dp_rank] for t in batch)
    micro = list(zip(ids.chunk(num_microbatches), mask.chunk(num_microbatches), weights.chunk(num_microbatches)))
    outputs: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        m_ids, m_mask, m_w = next(data_iterator)
        out = model(input_ids=m_ids, position_ids=position_ids_from_mask(m_mask),
                    attention_mask=attention_mask_4d(m_mask))

        def loss_func(output):
            if role == "actor":
                output = tensor_parallel.gather_from_tensor_model_parallel_region(output)
            outputs.append(output.detach())
            # Global mean over the whole batch: undo the schedule's /num_microbatches and DDP's /dp.
            loss = (output * m_w).sum() / B * num_microbatches * dp
            return loss, {}

        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=chunks,
        num_microbatches=num_microbatches, seq_length=S, micro_batch_size=ids.shape[0] // num_microbatches,
        forward_only=False,
    )
    grads = dict(full_tensors(chunks[0], select=lambda p: p.main_grad.clone()))
    _, grad_norm, _ = optimizer.step()
    params = dict(full_tensors(chunks[0]))
    keep_out = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    return {"dp_rank": dp_rank, "out": torch.cat(outputs) if keep_out else None,
            "grads": grads, "params": params, "grad_norm": grad_norm}


def merge(results: list[dict], tied: bool) -> dict:
    """Join per-rank results: outputs in DP order; tensors by global name (DP replicas must agree)."""
    outs = sorted((r["dp_rank"], r["out"]) for r in results if r["out"] is not None)
    merged = {"out": torch.cat([o for _, o in outs]), "grads": {}, "params": {}}
    for key in ("grads", "params"):
        for r in results:
            for name, t in r[key].items():
                if tied and name == "output_layer.weight":
                    name = "embedding.word_embeddings.weight@last_stage"
                if name in merged[key]:
                    torch.testing.assert_close(merged[key][name], t, atol=TOL, rtol=0, msg=f"DP replicas differ: {name}")
                merged[key][name] = t
    merged["grad_norm"] = results[0]["grad_norm"]
    return merged


def assert_same(ref: dict, got: dict, label: str) -> None:
    assert (ref["out"] - got["out"]).abs().max() <= TOL, f"{label}: outputs differ"
    assert abs(ref["grad_norm"] - got["grad_norm"]) <= 1e-4 * ref["grad_norm"], f"{label}: grad norm"
    for key in ("grads", "params"):
        names = {n.replace("@last_stage", "") for n in got[key]}
        assert names == set(ref[key]), f"{label}: {key} names differ: {names ^ set(ref[key])}"
        for name, t in got[key].items():
            diff = (ref[key][name.replace("@last_stage", "")] - t).abs().max().item()
            assert diff <= TOL, f"{label}: {key} {name} max abs diff {diff:.2e}"


CASES = [("actor", "llama", True), ("actor", "qwen3", False), ("critic", "qwen2", False)]


@pytest.mark.parametrize("role,arch,tied", CASES, ids=[f"{r}-{a}-{'tied' if t else 'untied'}" for r, a, t in CASES])
def test_layouts_match_single_process(role: str, arch: str, tied: bool, tmp_path) -> None:
    hf_config = tiny_hf_config(arch, tied)
    batch = make_batch(256 if role == "actor" else None)
    ckpt = str(tmp_path / "ckpt")
    ref = merge(run_distributed(one_step, 1, args=(role, hf_config, ckpt, batch, True, 1)), tied)
    assert ref["grad_norm"] > 1.0, "the clip should be active in this test"
    for tp, pp, world in LAYOUTS:
        got = run_distributed(one_step, world, tp=tp, pp=pp, args=(role, hf_config, ckpt, batch, False, 2))
        assert_same(ref, merge(got, tied), f"{role} tp={tp} pp={pp} dp={world // (tp * pp)}")


def test_one_step_changes_weights(tmp_path) -> None:
    """Guard against a vacuous parity: the step must actually move the weights."""
    hf_config = tiny_hf_config("llama", True)
    ckpt = str(tmp_path / "ckpt")
    before = run_distributed(lambda: None, 1)  # runtime smoke: a rank that does nothing returns
    assert before == [None]
    res = run_distributed(one_step, 1, args=("actor", hf_config, ckpt, make_batch(256), True, 1))[0]
    init = run_distributed(_params_at, 1, args=(hf_config, ckpt))[0]
    moved = max((res["params"][n] - init[n]).abs().max().item() for n in init)
    assert moved > 1e-4


def _params_at(hf_config, ckpt: str) -> dict:
    from megatron_gad.checkpoint import load_model
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.build import build_model
    from megatron_gad.models.sharding import full_tensors

    cfg = transformer_config_from_hf(hf_config)
    args = model_args_from_hf(hf_config)
    chunks = build_model(lambda pre, post: build_actor(cfg, args, pre, post), cfg)
    load_model(chunks, ckpt)
    return dict(full_tensors(chunks[0]))
