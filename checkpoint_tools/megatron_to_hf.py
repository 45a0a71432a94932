"""Convert a megatron_gad checkpoint (written by hf_to_megatron.py) into a Hugging Face directory.

    python checkpoint_tools/megatron_to_hf.py --megatron-dir DIR --out DIR [--max-shard-size 5GB]
    torchrun --nproc_per_node 4 checkpoint_tools/megatron_to_hf.py --megatron-dir DIR --out DIR --tp 2 --pp 2

Writes config.json (``<Arch>ForCausalLM``, or ``<Arch>ForSequenceClassification`` with
``num_labels=1`` for a critic), ``model.safetensors`` or shards with an index, and the tokenizer
files kept in the Megatron directory, all flushed to disk before the directory appears. The
checkpoint is read without building a model; under torchrun each pipeline stage's TP-rank-0 rank
reads and writes that stage's layers. Exit 2 with a one-line message on a user error or an OS
error (a full disk).
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
    p.add_argument("--megatron-dir", required=True, help="checkpoint written by hf_to_megatron.py")
    p.add_argument("--out", required=True, help="HF directory to create (must not exist)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 500MB, 5GB")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run (under torchrun)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the HF tensors (default: the checkpoint's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)

    def preflight() -> None:
        convert.preflight_megatron(args.megatron_dir, args.tp, args.pp)
        convert.parse_size(args.max_shard_size)
        convert.check_output_free(args.out)

    def work() -> int:
        start = time.perf_counter()
        dtype = getattr(torch, args.dtype) if args.dtype else None
        convert.megatron_to_hf(args.megatron_dir, args.out, max_shard_size=args.max_shard_size, dtype=dtype)
        if convert.is_main_rank():
            print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
        return 0

    return convert.run_cli(preflight, work, args.tp, args.pp)


if __name__ == "__main__":
    sys.exit(main())
