"""The resharding plan from a Megatron TP x PP layout into rollout TP shards, bit for bit.

As in test_weight_export: a one-process run saves a Megatron checkpoint and its TP=1 export (the
HF tensors from ``megatron_to_hf_tensors`` over ``full_tensors``) is the reference. Each parallel
layout loads the checkpoint and hands back every rank's LOCAL shards (no gather); the plan built
from the exporter's metadata assembles each rollout rank's shards from those alone. They must equal
an independent slicing of the reference by vLLM's sharding rules, and reassemble to the reference.
"""

from __future__ import annotations

import pytest
import torch

from megatron_gad.runtime.spawn import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

VOCAB = 200


def tiny_hf_config(arch: str, tied: bool, groups: int = 2):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    return cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=groups, max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=1e-6,
               **extra)


def shards_rank(hf_config, ckpt: str, save: bool) -> dict:
    """Per rank: build, save or load the checkpoint; return the exporter's metadata, this rank's
    local shards under global names and, in the one-process run, the TP=1 export."""
    from megatron.core import parallel_state as ps

    from megatron_gad.checkpoint import load_model, save_model
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models import sharding
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.build import build_model
    from megatron_gad.models.hf_mapping import megatron_to_hf_tensors
    from megatron_gad.rollout.weight_export import WeightExporter

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    cfg = transformer_config_from_hf(hf_config, tp=tp, pp=pp)
    args = model_args_from_hf(hf_config)
    chunks = build_model(lambda pre, post: build_actor(cfg, args, pre, post), cfg)
    (save_model if save else load_model)(chunks, ckpt)
    metas = WeightExporter(chunks, hf_config, dtype=torch.bfloat16).metadata()
    model = sharding.unwrap(chunks[0])
    offset = sharding.layer_offset(model)
    local = {(sharding.global_name(n, offset), ps.get_tensor_model_parallel_rank()): p.detach().bfloat16().clone()
             for n, p in model.named_parameters()}
    expected = None
    if save:
        expected = {}
        for name, full in sharding.full_tensors(chunks[0]):
            for hf_name, t in megatron_to_hf_tensors(name, full, hf_config):
                expected[hf_name] = t.bfloat16()
    return {"metas": metas, "local": local, "expected": expected, "dp_rank": ps.get_data_parallel_rank()}


def vllm_slice(name: str, full: torch.Tensor, hf_config, rank: int, tp: int) -> torch.Tensor:
    """Rollout rank ``rank``'s shard of a full HF tensor, written from vLLM's layer rules directly
    (independent of the plan's arithmetic)."""
    groups, d = hf_config.num_key_value_heads, getattr(hf_config, "head_dim", None) or 16
    if name.endswith(("norm.weight",)):
        return full
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        padded = -(-VOCAB // 64) * 64
        per = padded // tp
        out = torch.zeros(per, full.shape[1], dtype=full.dtype)
        rows = full[rank * per: (rank + 1) * per]
        out[: rows.shape[0]] = rows
        return out
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return full.chunk(tp, dim=1)[rank]
    if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")) and tp > groups:
        head = rank // (tp // groups)
        return full[head * d: (head + 1) * d]
    return full.chunk(tp, dim=0)[rank]


def _check(hf_config, ckpt, ref, tp: int, pp: int, dst_tps) -> None:
    from megatron_gad.rollout.reshard import assemble, full_from_shards, plan_resharding

    expected = ref["expected"]
    world = tp * pp
    results = ref["results"] if world == 1 else run_distributed(shards_rank, world, tp=tp, pp=pp,
                                                                args=(hf_config, ckpt, False))
    metas = results[0]["metas"]
    shards: dict = {}
    for res in results:
        assert res["metas"] == metas
        for key, t in res["local"].items():
            assert key not in shards
            shards[key] = t
    for dst_tp in dst_tps:
        label = f"megatron tp={tp} pp={pp} -> rollout tp={dst_tp}"
        plan = plan_resharding(metas, hf_config, tp, pp, dst_tp)
        per_rank = [assemble(plan, shards, r) for r in range(dst_tp)]
        for r, got in enumerate(per_rank):
            assert got.keys() == expected.keys(), f"{label} rank {r}: names differ {set(got) ^ set(expected)}"
            for name, full in expected.items():
                want = vllm_slice(name, full, hf_config, r, dst_tp)
                assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want), f"{label} rank {r}: {name}"
        back = full_from_shards(per_rank, hf_config)
        for name, full in expected.items():
            assert torch.equal(back[name], full), f"{label}: {name} does not reassemble to the TP1 export"
        # every byte of the TP1 export is delivered once per rank that holds it, and no more
        sent = sum(plan.bytes_between(2).values())
        held = sum(t.numel() * 2 for got in per_rank for n, t in got.items())
        padding = sum(int((t == 0).all(dim=-1).sum()) * t.shape[-1] * 2 for got in per_rank
                      for n, t in got.items() if n.endswith(("embed_tokens.weight", "lm_head.weight")))
        assert sent == held - padding, label


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("llama", True)], ids=["qwen2-untied", "llama-tied"])
def test_plan_matches_the_tp1_export_at_every_layout(arch: str, tied: bool, tmp_path) -> None:
    hf_config = tiny_hf_config(arch, tied)
    ckpt = str(tmp_path / "ckpt")
    results = run_distributed(shards_rank, 1, args=(hf_config, ckpt, True))
    ref = {"expected": results[0]["expected"], "results": results}
    # rollout TP 4 > the 2 KV heads: KV heads replicated
    _check(hf_config, ckpt, ref, 1, 1, (1, 2, 4))
    _check(hf_config, ckpt, ref, 2, 2, (1, 2, 4))
    if not tied:
        _check(hf_config, ckpt, ref, 2, 1, (1, 4))


def test_plan_refuses_layouts_that_do_not_divide() -> None:
    from megatron_gad.rollout.reshard import ReshardError, plan_resharding
    from megatron_gad.rollout.weight_export import ParamMeta

    hf_config = tiny_hf_config("llama", False, groups=2)
    metas = [ParamMeta("decoder.layers.0.mlp.linear_fc1.weight", (192, 64), 0)]
    with pytest.raises(ReshardError, match="rollout TP 3 must divide or be a multiple of the 2 KV heads"):
        plan_resharding(metas, hf_config, 1, 1, 3)
    with pytest.raises(ReshardError, match="attention heads at the rollout TP"):
        plan_resharding(metas, hf_config, 1, 1, 8)
    with pytest.raises(ReshardError, match="only the actor"):
        plan_resharding(metas, hf_config, 1, 1, 1, role="critic")
