"""Convert a Hugging Face directory into a megatron_gad ``dist_checkpointing`` checkpoint.

    python checkpoint_tools/hf_to_megatron.py --hf-dir DIR --out DIR [--role actor|critic]
    torchrun --nproc_per_node 4 checkpoint_tools/hf_to_megatron.py --hf-dir DIR --out DIR --tp 2 --pp 2

The checkpoint loads at any TP/PP layout; running under torchrun only spreads the work (each rank
reads and writes its own shards). Exit 2 with a one-line message on a user error or an OS error
(a full disk).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from megatron_gad.runtime.cpu_shims import skip_jit_fuser

skip_jit_fuser()  # before megatron-core's import: on CPU its fused functions never run (~1.5 CPU-s of start-up)

from megatron_gad import convert  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF directory: config.json + safetensors (sharded or not)")
    p.add_argument("--out", required=True, help="Megatron checkpoint directory to create (must not exist)")
    p.add_argument("--role", choices=("actor", "critic"), default="actor",
                   help="critic: the HF checkpoint has score.weight [1, hidden] (ForSequenceClassification)")
    p.add_argument("--init-score-head", type=float, default=None, metavar="STD",
                   help="critic from a *ForCausalLM checkpoint: drop lm_head, draw score.weight from N(0, STD^2)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run (under torchrun)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype to save (default: the HF tensors' dtype)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)

    def work() -> int:
        start = time.perf_counter()
        dtype = getattr(torch, args.dtype) if args.dtype else None
        info = convert.hf_to_megatron(args.hf_dir, args.out, role=args.role, dtype=dtype,
                                      init_score_head=args.init_score_head)
        if convert.is_main_rank():
            print(f"wrote {args.out} ({args.role}, {info['params']:,} parameters on rank 0) "
                  f"in {time.perf_counter() - start:.1f}s")
        return 0

    def preflight() -> None:
        convert.preflight_hf(args.hf_dir, args.role, args.tp, args.pp, args.init_score_head)
        convert.check_output_free(args.out)

    return convert.run_cli(preflight, work, args.tp, args.pp)


if __name__ == "__main__":
    sys.exit(main())
