"""Benchmark: the actor's output layer on the positions a loss reads against every position.

A student of SmolLM2-135M-Instruct's shape (hidden 576, 9 heads of 64 with 3 KV heads, FFN
1536, vocabulary 49152, tied embeddings, fp32; its first ``--layers`` layers, 6 as the
SmolLM2 distillation's student) with random weights, on synthetic sequences of ``--prompt`` +
``--response`` tokens: one strictly on-policy GSPO step and one SFT step (targets: the
response tokens) over ``--rows`` sequences in micro-batches of ``--micro``. Each step runs
with the logits window (the default: the output layer projects only the positions whose
logits a loss reads, see ``megatron_gad.models.actor.logits_at``) and without it (every
position projected, the loss cutting out what it reads), alternating, one process, one thread.

    python benchmarks/logits_window.py [--layers 6] [--rows 32] [--prompt 40] [--response 24] [--runs 3]

Prints CPU-s per step (median of ``--runs`` after one warm-up) and, as its last line,
``gspo_ratio=<windowed / full> sft_ratio=<windowed / full>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_config(layers: int, hidden: int, vocab: int):
    from transformers import LlamaConfig

    heads = max(hidden // 64, 1)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(heads // 3, 1), max_position_embeddings=2048,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """CPU-s of each step kind, per variant ("windowed", "full"), after one warm-up each."""
    import time

    import torch

    from megatron_gad.engine import ActorConfig, ActorEngine, PolicyBatch, SequenceBatch
    from megatron_gad.engine import forward_step
    from megatron_gad.engine.batch import SftBatch
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.build import OptimConfig
    from megatron_gad.models.inputs import position_ids_from_mask

    torch.set_num_threads(1)
    hf = hf_config(args.layers, args.hidden, args.vocab)
    settings = ActorConfig(policy_loss="gspo", loss_agg_mode="seq-mean-token-mean",
                           ppo_micro_batch_size_per_gpu=args.micro, optim=OptimConfig(lr=1e-6, clip_grad=1.0))
    actor = ActorEngine.create(transformer_config_from_hf(hf), model_args_from_hf(hf), settings, settings.optim)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args.vocab, (args.rows, args.prompt + args.response), generator=g)
    mask = torch.ones_like(ids)
    seq = SequenceBatch.from_ids(ids, mask, mask[:, args.prompt:].clone())
    policy = PolicyBatch(seq, None, torch.randn(args.rows, 1, generator=g).expand(args.rows, args.response).clone())
    targets = mask.clone()
    targets[:, :args.prompt] = 0
    sft = SftBatch(ids, mask, position_ids_from_mask(mask), targets)
    windowed = forward_step.logits_at
    variants = {"windowed": windowed, "full": lambda window: contextlib.nullcontext()}
    steps = {"gspo": lambda: actor.update_on_policy(policy, temperature=1.0), "sft": lambda: actor.sft_update(sft)}
    times: dict[str, list[float]] = {f"{k}/{v}": [] for k in steps for v in variants}
    try:
        for run in range(args.runs + 1):
            for variant, context in variants.items():
                forward_step.logits_at = context
                for kind, step in steps.items():
                    start = time.process_time()
                    step()
                    if run:  # the first round warms up
                        times[f"{kind}/{variant}"].append(time.process_time() - start)
                    print(f"round {run}/{args.runs} {variant} {kind}: {time.process_time() - start:.2f} CPU-s",
                          file=sys.stderr, flush=True)
    finally:
        forward_step.logits_at = windowed
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--response", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.rows % args.micro:
        parser.error(f"--micro {args.micro} must divide --rows {args.rows}")
    sys.path.insert(0, REPO)
    from megatron_gad.runtime.spawn import run_distributed

    times = run_distributed(measure, 1, args=(args,), timeout_s=3600)[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {args.rows} sequences of "
          f"{args.prompt} + {args.response} tokens, micro-batches of {args.micro}; median of {args.runs} runs")
    print(f"{'step':<6}{'windowed CPU-s':>16}{'full CPU-s':>12}{'ratio':>8}")
    for kind in ("gspo", "sft"):
        print(f"{kind:<6}{med[kind + '/windowed']:>16.3f}{med[kind + '/full']:>12.3f}"
              f"{med[kind + '/windowed'] / med[kind + '/full']:>8.2f}")
    print(" ".join(f"{kind}_ratio={med[kind + '/windowed'] / med[kind + '/full']:.2f}" for kind in ("gspo", "sft")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
