#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent: a second run with an
# unchanged setup.py takes about a second. torch is installed FIRST and pinned to 2.13.0 so that pip
# keeps the CPU build instead of resolving a multi-GB CUDA one. On a GPU machine, install the CUDA
# torch and the extras (`pip install -e .[gpu,vllm]`) yourself, or use the Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.megatron_gad_setup
want="torch==2.13.0 $(sha256sum setup.py | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
rm -f "$STAMP"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing torch==2.13.0 (CPU build) first"
"$VENV/bin/python" -m pip install -q torch==2.13.0
echo "[setup] installing megatron_gad and its test dependencies"
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -W ignore -c "import torch, megatron.core; print(f'[setup] torch {torch.__version__}, megatron-core {megatron.core.__version__}')"
echo "$want" > "$STAMP"
