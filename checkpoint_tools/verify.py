"""Compare a Hugging Face model with its megatron_gad checkpoint on the same random tokens.

    python checkpoint_tools/verify.py --hf-dir DIR --megatron-dir DIR [--tol 1e-4]
    torchrun --nproc_per_node 2 checkpoint_tools/verify.py --hf-dir DIR --megatron-dir DIR --tp 2

Both run in fp32; prints the max absolute difference of the logits over the real vocabulary (per-
token scores for a critic). Exit 1 above ``--tol``, 2 on a user error.
"""

from __future__ import annotations

import argparse
import sys

from megatron_gad.runtime.cpu_shims import skip_jit_fuser

skip_jit_fuser()  # before megatron-core's import: on CPU its fused functions never run (~1.5 CPU-s of start-up)

from megatron_gad import convert  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF directory (config.json + safetensors)")
    p.add_argument("--megatron-dir", required=True, help="checkpoint written by hf_to_megatron.py")
    p.add_argument("--tol", type=float, default=1e-4, help="largest accepted max abs difference (fp32)")
    p.add_argument("--batch", type=int, default=2, help="sequences of random tokens")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (under torchrun)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 within tolerance, 1 above it, 2 on a user error)."""
    args = parse_args(argv)

    def preflight() -> None:
        convert.read_hf_config(args.hf_dir)
        convert.preflight_megatron(args.megatron_dir, args.tp, args.pp)

    def work() -> int:
        diff = convert.verify_logits(args.hf_dir, args.megatron_dir, args.batch, args.seq, args.seed)
        ok = diff <= args.tol
        if convert.is_main_rank():
            print(f"max abs logit diff: {diff:.3e} (tol {args.tol:.1e}, TP={args.tp} PP={args.pp}) "
                  f"{'OK' if ok else 'FAIL'}")
        return 0 if ok else 1

    return convert.run_cli(preflight, work, args.tp, args.pp)


if __name__ == "__main__":
    sys.exit(main())
