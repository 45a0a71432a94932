"""The CUDA paths that need neither vLLM nor Transformer Engine (``gpu`` marker; skipped without
CUDA): bf16 training with fp32 master weights on NCCL, the weight export on the GPU, and the
built-in rollout engine on the GPU agreeing with Megatron's log-probs.

Each test runs in a fresh interpreter: the pytest process may already hold a CUDA context (the
vLLM tests create one), and a process group of its own must not leak into other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PRELUDE = """
import torch
from transformers import LlamaConfig
from megatron_gad.runtime.distributed import init_distributed, destroy_distributed
from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
from megatron_gad.engine.actor import ActorEngine
from megatron_gad.engine.config import ActorConfig
from megatron_gad.engine.batch import SftBatch, SequenceBatch
from megatron_gad.models.build import OptimConfig

info = init_distributed(tp=1, pp=1, seed=3)
assert info.device.type == "cuda", info.device
import torch.distributed as dist
assert dist.get_backend() == "nccl", dist.get_backend()
hf = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)
cfg = transformer_config_from_hf(hf)
args = model_args_from_hf(hf)
actor = ActorEngine.create(cfg, args, ActorConfig(ppo_micro_batch_size_per_gpu=4), OptimConfig(lr=1e-3))
g = torch.Generator().manual_seed(0)
"""


def _run(body: str) -> str:
    code = PRELUDE + textwrap.dedent(body) + "\ndestroy_distributed()\nprint('OK')\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_bf16_actor_trains_with_fp32_master_weights_on_nccl() -> None:
    _run("""
    params = list(actor.chunks[0].parameters())
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in params)
    inner = [o.optimizer for o in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])]
    masters = [p for opt in inner for group in opt.param_groups for p in group["params"]]
    assert masters and all(p.dtype == torch.float32 for p in masters), {p.dtype for p in masters}
    ids = torch.randint(3, 512, (8, 64), generator=g)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 16:] = 1
    batch = SftBatch(ids, torch.ones_like(ids), torch.arange(64).expand(8, 64).contiguous(), loss_mask)
    before = [p.detach().clone() for p in params]
    first = actor.sft_update(batch)
    second = actor.sft_update(batch)
    assert torch.isfinite(torch.tensor(first["actor/grad_norm"])) and first["actor/update_skipped"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, params)), "the step changed no weight"
    assert second["actor/sft_loss"] < first["actor/sft_loss"], (first, second)
    """)


def test_export_on_cuda_equals_the_conversion_and_feeds_the_builtin_engine_on_the_gpu() -> None:
    _run("""
    from megatron_gad.models.hf_mapping import megatron_to_hf_tensors
    from megatron_gad.models.sharding import full_tensors
    from megatron_gad.rollout.base import RolloutConfig, TokenSpec, make_rollout_engine
    from megatron_gad.rollout.weight_export import WeightExporter, sync_weights

    exporter = WeightExporter(actor.chunks, hf, dtype=torch.bfloat16)
    got = {n: t.clone() for bucket in exporter.buckets() for n, t in bucket}
    want = {h: t.to(torch.bfloat16) for n, full in full_tensors(actor.chunks[0])
            for h, t in megatron_to_hf_tensors(n, full, hf)}
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].is_cuda and torch.equal(got[name], t), name
    engine = make_rollout_engine(RolloutConfig(name="cpu", response_length=16, temperature=1.0), hf,
                                 TokenSpec(0, (2,)))
    assert engine.device.type == "cuda", engine.device
    sync_weights(exporter, engine)
    prompts = torch.randint(3, 512, (4, 8), generator=g)
    out = engine.generate(prompts, torch.ones_like(prompts), n=2, seed=5)
    rows = out.responses.shape[0]
    ids = torch.cat([prompts.repeat_interleave(2, 0), out.responses], 1)
    mask = torch.cat([torch.ones(rows, 8, dtype=torch.long), out.response_mask], 1)
    seq = SequenceBatch.from_ids(ids, mask, out.response_mask)
    logp, _ = actor.compute_log_probs(seq, temperature=1.0, micro_batch_size=4)
    valid = out.response_mask.bool()
    diff = (logp - out.rollout_log_probs).abs()[valid]
    # bf16 Megatron forward against the fp32 engine holding the same (bf16-rounded) weights
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())
    print("logprob |diff| mean", float(diff.mean()), "max", float(diff.max()))
    """)
