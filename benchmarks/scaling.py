"""Scaling benchmark: actor step cost against tokens per step, and the cost of model parallelism.

One actor GSPO step (the strictly on-policy update: forward, backward, optimizer step) of the
demo student's shape (2 layers, hidden 128, 4 heads, tied embeddings, vocab 32, fp32) on
synthetic sequences of ``--prompt`` + ``--response`` tokens, micro-batches of 16 sequences.

1. At TP1 (one process) over ``--sizes`` sequences per step: CPU-s per step (median of
   ``--repeats`` after one warm-up step) against tokens per step, the least-squares line and its
   R² (a regression guard: a step should cost a fixed overhead plus a constant per token).
2. The same work (the largest size) at TP2, PP2 and TP2 x PP2 (gloo ranks on this machine):
   CPU-s per step summed over the ranks, against TP1. On one machine model parallelism cannot
   be faster in CPU-s; the ratio is its overhead (communication, smaller matmuls, pipeline
   bubbles), which should stay small.

    python benchmarks/scaling.py [--sizes 16 32 64 128] [--repeats 3]

Every rank runs with one intra-op thread. The last line is
``r2=<fit> tp2=<x> pp2=<y> tp2pp2=<z>`` (CPU-s ratios against TP1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       tie_word_embeddings=True, rms_norm_eps=1e-6)


def batch(rows: int, prompt: int, response: int, seed: int):
    import torch

    from megatron_gad.engine import PolicyBatch, SequenceBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 32, (rows, prompt + response), generator=g)
    mask = torch.ones_like(ids)
    seq = SequenceBatch.from_ids(ids, mask, mask[:, prompt:].clone())
    adv = torch.randn(rows, 1, generator=g).expand(rows, response).clone()
    return PolicyBatch(seq, None, adv)


def measure(sizes: list[int], prompt: int, response: int, repeats: int) -> list[float]:
    """Per rank: CPU-s of one actor step (median of ``repeats``) for each size."""
    import time

    import torch

    from megatron.core import parallel_state as ps

    from megatron_gad.engine import ActorConfig, ActorEngine
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.build import OptimConfig

    torch.set_num_threads(1)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    cfg = transformer_config_from_hf(hf_config(), tp=tp, pp=pp)
    settings = ActorConfig(policy_loss="gspo", loss_agg_mode="seq-mean-token-mean", ppo_micro_batch_size_per_gpu=16,
                           optim=OptimConfig(lr=1e-6))
    actor = ActorEngine.create(cfg, model_args_from_hf(hf_config()), settings, settings.optim)
    out = []
    for rows in sizes:
        times = []
        for i in range(repeats + 1):
            data = batch(rows, prompt, response, seed=i)
            start = time.process_time()
            actor.update_on_policy(data, temperature=1.0, shuffle_seed=i)
            if i:  # the first step warms up (allocations, first-call paths)
                times.append(time.process_time() - start)
        out.append(statistics.median(times))
    return out


def run(world: int, tp: int, pp: int, sizes: list[int], args) -> list[float]:
    """CPU-s per step for each size, summed over the ranks."""
    from megatron_gad.runtime.spawn import run_distributed

    per_rank = run_distributed(measure, world, tp=tp, pp=pp, timeout_s=1800,
                               args=(sizes, args.prompt, args.response, args.repeats))
    return [sum(r[i] for r in per_rank) for i in range(len(sizes))]


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """(intercept, slope, R²) of the least-squares line through (x, y)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    intercept = my - slope * mx
    ss_res = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y))
    ss_tot = sum((b - my) ** 2 for b in y)
    return intercept, slope, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128], help="sequences per step")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--response", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if len(args.sizes) < 4 or any(s % 16 for s in args.sizes):
        parser.error("--sizes needs at least 4 sizes, each a multiple of the 16-sequence micro-batch")
    os.environ["OMP_NUM_THREADS"] = "1"
    sys.path.insert(0, REPO)
    sizes = sorted(args.sizes)
    tp1 = run(1, 1, 1, sizes, args)
    tokens = [s * (args.prompt + args.response) for s in sizes]
    intercept, slope, r2 = linear_fit(tokens, tp1)
    print(f"{'sequences':>9s} {'tokens':>7s} {'CPU-s/step':>10s} {'fit':>7s}")
    for s, t, c in zip(sizes, tokens, tp1):
        print(f"{s:9d} {t:7d} {c:10.3f} {intercept + slope * t:7.3f}")
    print(f"fit: {intercept:.3f} CPU-s + {slope * 1e3:.3f} CPU-ms per token, R²={r2:.4f}")
    layouts = {"tp2": (2, 2, 1), "pp2": (2, 1, 2), "tp2pp2": (4, 2, 2)}
    ratios = {}
    print(f"\n{'layout':>7s} {'ranks':>5s} {'CPU-s/step (all ranks)':>22s} {'vs TP1':>7s}   ({sizes[-1]} sequences)")
    print(f"{'tp1':>7s} {1:5d} {tp1[-1]:22.3f} {1.0:7.2f}")
    for name, (world, tp, pp) in layouts.items():
        cost = run(world, tp, pp, sizes[-1:], args)[0]
        ratios[name] = cost / tp1[-1]
        print(f"{name:>7s} {world:5d} {cost:22.3f} {ratios[name]:7.2f}")
    print(f"r2={r2:.4f} " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
