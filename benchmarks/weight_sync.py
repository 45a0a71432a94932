"""Weight-sync benchmark: stream the actor's weights from Megatron shards into a rollout engine.

For a Llama-shaped model of a few hundred MB, at TP=1 and TP=2 x PP=2 (gloo ranks on this
machine), times (a) the export alone (buckets drained and dropped on rank 0: every tensor that
must be assembled is a new one), (b) the first export + ``load_weights`` into the CPU rollout
engine on rank 0 (it allocates what the engine keeps: at TP=2 x PP=2 the exporter's
shared-memory arena) and (c) the later syncs, which write into the engine's own parameters, and
sets them beside a plain in-memory copy of the same number of bytes on rank 0 (the bound no sync
can beat on one machine). The last line gives sync GB/s / memcpy GB/s per layout for (c), what
every training step pays (the goal: at least 0.5, within 2x of the copy).

    python benchmarks/weight_sync.py [--layers 8] [--hidden 1024] [--bucket-mb 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def bench_config(hidden: int, layers: int):
    """A Llama-style config: GQA with half the heads as KV groups, untied 32k vocab."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, max_position_embeddings=2048,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
    )


def run_rank(hf_config, bucket_bytes: int, repeats: int) -> dict:
    """Per rank: build the sharded actor, then time export-only and export+load ``repeats`` times."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.build import build_model
    from megatron_gad.rollout.base import RolloutConfig, TokenSpec
    from megatron_gad.rollout.cpu_engine import CPURolloutEngine
    from megatron_gad.rollout.weight_export import WeightExporter, sync_weights

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    cfg = transformer_config_from_hf(hf_config, tp=tp, pp=pp)
    chunks = build_model(lambda pre, post: build_actor(cfg, model_args_from_hf(hf_config), pre, post), cfg)
    exporter = WeightExporter(chunks, hf_config, dtype=torch.float32, bucket_bytes=bucket_bytes, dst_ranks=(0,))
    exporter.metadata()  # one-time metadata exchange, outside the timings
    engine = None
    if dist.get_rank() == 0:
        engine = CPURolloutEngine(RolloutConfig(name="cpu"), hf_config, TokenSpec(0, (2,)))
    dist.barrier()
    start = time.perf_counter()
    sync_weights(exporter, engine)  # the engine's first load
    dist.barrier()
    first_s = time.perf_counter() - start
    export_s, sync_s = [], []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        sync_weights(exporter, None)
        dist.barrier()
        export_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        stats = sync_weights(exporter, engine)
        dist.barrier()
        sync_s.append(time.perf_counter() - start)
    result = {"export_s": min(export_s), "sync_s": min(sync_s), "first_s": first_s, "bytes": stats.exported_bytes,
              "peak": stats.peak_bytes, "buckets": stats.num_buckets}
    if dist.get_rank() == 0:
        result["copy_s"] = plain_copy_seconds(stats.exported_bytes, repeats)
    return result


def plain_copy_seconds(nbytes: int, repeats: int) -> float:
    """Best time of one in-memory copy of ``nbytes`` (fp32 buffer to fp32 buffer, this thread count)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.hidden % 128 or args.layers % 2 or args.bucket_mb <= 0 or args.repeats < 1:
        print("error: --hidden must be a multiple of 128, --layers even, --bucket-mb > 0, --repeats >= 1",
              file=sys.stderr)
        return 2
    from megatron_gad.runtime.spawn import run_distributed

    hf_config = bench_config(args.hidden, args.layers)
    bucket = int(args.bucket_mb * 1024**2)
    rows = []
    for label, tp, pp in (("TP=1", 1, 1), ("TP=2 x PP=2", 2, 2)):
        res = run_distributed(run_rank, tp * pp, tp=tp, pp=pp, timeout_s=900, args=(hf_config, bucket, args.repeats))
        r0 = res[0]
        rows.append((label, r0))
    gb = 1e9
    print(f"model: llama hidden={args.hidden} layers={args.layers} vocab=32000, fp32 export, "
          f"bucket {args.bucket_mb:g} MB, threads/rank=1, best of {args.repeats}")
    header = (f"{'layout':<12} {'MB':>7} {'bkts':>4} {'peak MB':>8} {'export s':>9} {'export GB/s':>11} "
              f"{'first sync s':>12} {'export+load s':>13} {'sync GB/s':>9} {'memcpy GB/s':>11} {'sync/memcpy':>11}")
    print(header)
    print("-" * len(header))
    for label, r in rows:
        copy_gbs = r["bytes"] / r["copy_s"] / gb
        sync_gbs = r["bytes"] / r["sync_s"] / gb
        print(f"{label:<12} {r['bytes'] / 1e6:>7.0f} {r['buckets']:>4} {r['peak'] / 1e6:>8.0f} {r['export_s']:>9.3f} "
              f"{r['bytes'] / r['export_s'] / gb:>11.2f} {r['first_s']:>12.3f} {r['sync_s']:>13.3f} "
              f"{sync_gbs:>9.2f} {copy_gbs:>11.2f} "
              f"{sync_gbs / copy_gbs:>11.3f}")
    ratios = {label.replace(" ", ""): (r["bytes"] / r["sync_s"]) / (r["bytes"] / r["copy_s"]) for label, r in rows}
    print(" ".join(f"sync_over_memcpy[{k}]={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
