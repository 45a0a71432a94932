#!/usr/bin/env bash
# Set up the environment (idempotent) and run the embedded demo on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/torchrun --nproc_per_node "${NPROC:-1}" examples/pretrain_gad.py "$@"
