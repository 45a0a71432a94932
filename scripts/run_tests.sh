#!/usr/bin/env bash
# Set up the environment (idempotent) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
.venv/bin/python -m pytest "$@"
echo "[tests] wall time $(( $(date +%s) - start ))s"
