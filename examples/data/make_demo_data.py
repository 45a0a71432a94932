"""Generate the offline demo assets: addition task parquet files, tokenizer, tiny model configs.

    python examples/data/make_demo_data.py --out examples/data/demo [--seed N] [--force] [--task styles]

Without ``--force`` an existing complete set with the same seed is kept as it is.
"""

from __future__ import annotations

import argparse
import sys

from megatron_gad.data.demo import DEFAULT_SEED, TASKS, ensure_demo_assets, read_manifest
from megatron_gad.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, make (or keep) the assets, print where they are; 2 on a user error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/data/demo", help="output directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the generated data")
    parser.add_argument("--force", action="store_true", help="regenerate even if the assets exist")
    parser.add_argument("--task", choices=TASKS, default="arith",
                        help="arith: one answer style (default); styles: the teacher picks one of several")
    args = parser.parse_args(argv)
    try:
        assets = ensure_demo_assets(args.out, seed=args.seed, force=args.force, task=args.task)
    except (UserError, OSError) as exc:  # a foreign directory in the way; a full or read-only disk
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = read_manifest(assets.root) or {}
    print(f"demo assets in {assets.root} (seed {manifest.get('seed')}, vocab {manifest.get('vocab_size')})")
    for name in ("train_file", "val_file", "train_standard_file", "val_standard_file",
                 "tokenizer_dir", "student_dir", "discriminator_dir"):
        print(f"  {name}: {getattr(assets, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
