#!/usr/bin/env bash
# One prepared check of the CUDA paths, sized for a short lease on one GPU (target: under 8 minutes
# on one H200), with nothing downloaded on the GPU machine.
#
#   scripts/gpu_check.sh --prepare DIR   on a machine with network: download the cp312 manylinux
#                                        wheels the GPU machine lacks (megatron-core 0.16.1 and the
#                                        small pure-Python dependencies) and build this package's
#                                        wheel into DIR; prints the total size (must stay < 64 MiB).
#   scripts/gpu_check.sh [--wheels DIR]  on the GPU machine: install the wheels of DIR offline
#                                        (default: wheels/ in the repository root, skipped when
#                                        absent), then run scripts/gpu_check.py: the gpu-marked
#                                        tests, a bf16 actor training step at 3 sequence lengths
#                                        (tokens/s, MFU), a GAD demo run on CUDA with the built-in
#                                        engine (step time by phase), and the weight export against
#                                        a device-to-device copy of the same bytes. One table; JSON
#                                        under $OUT when set.
#   scripts/gpu_check.sh --dry-run       the same code on the CPU with tiny shapes (CI runs this).
#
# Extra arguments after the mode are passed to scripts/gpu_check.py (see its --help).
#
# From a session with the device tool: `scripts/gpu_check.sh --prepare wheels` here (wheels/ is
# git-ignored), then run the check there with carry=["wheels"] and the command
# `scripts/gpu_check.sh`; the table is in the output, gpu_check.json / gpu_check.txt under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
# $PYTHON if set; else the project's .venv for --dry-run / --prepare (scripts/setup.sh makes it), python3 on
# the GPU machine (its preinstalled CUDA torch)
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && [ "${1:-}" != "--wheels" ] && { [ "${1:-}" = "--dry-run" ] || [ "${1:-}" = "--prepare" ]; }; then
    PYTHON=.venv/bin/python
  fi
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Wheels the GPU machine does not come with (it has torch, transformers and their dependencies:
# numpy, safetensors, tokenizers, PyYAML, tqdm). Pure-Python ones are tiny; pyarrow is
# the one large wheel (the parquet reader of the demo data), installed only where it is missing.
PREPARE_WHEELS=(megatron-core==0.16.1 einops psutil pyarrow pytest pytest-timeout pluggy iniconfig pygments packaging)
LIMIT_BYTES=$((64 * 1024 * 1024))

prepare() {
  local dir=$1
  mkdir -p "$dir"
  echo "[gpu_check] downloading ${PREPARE_WHEELS[*]} (cp312, manylinux x86_64) into $dir"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dir" "${PREPARE_WHEELS[@]}"
  echo "[gpu_check] building the megatron_gad wheel"
  "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" .
  local total
  total=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
  ls -l "$dir"/*.whl | awk '{printf "  %10d  %s\n", $5, $NF}'
  echo "[gpu_check] total $total bytes ($(( total / 1024 / 1024 )) MiB) of at most $LIMIT_BYTES"
  if [ "$total" -ge "$LIMIT_BYTES" ]; then
    echo "[gpu_check] error: the wheels in $dir exceed 64 MiB; drop one that the GPU machine already has" >&2
    exit 1
  fi
}

install_wheels() {
  local dir=$1
  if ! ls "$dir"/megatron_gad-*.whl >/dev/null 2>&1; then
    echo "[gpu_check] error: no megatron_gad wheel in $dir (run scripts/gpu_check.sh --prepare $dir first)" >&2
    exit 2
  fi
  echo "[gpu_check] installing from $dir (offline; what the machine already has is kept)"
  # --no-index: nothing is downloaded; pip resolves against the machine's packages and DIR only,
  # so the preinstalled torch and transformers stay as they are.
  # the GPU machine is disposable: allow installing into its system Python (PEP 668)
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install -q --no-index --find-links "$dir" "megatron_gad[test]" || {
    echo "[gpu_check] error: offline install from $dir failed (a dependency missing from the wheels?)" >&2
    exit 2
  }
}

case "${1:-}" in
  --prepare)
    [ $# -ge 2 ] || { echo "usage: scripts/gpu_check.sh --prepare DIR" >&2; exit 2; }
    prepare "$2"
    ;;
  --dry-run)
    shift
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    exec "$PYTHON" scripts/gpu_check.py --dry-run "$@"
    ;;
  *)
    wheels=wheels
    if [ "${1:-}" = "--wheels" ]; then
      [ $# -ge 2 ] || { echo "usage: scripts/gpu_check.sh --wheels DIR" >&2; exit 2; }
      wheels=$2
      shift 2
      install_wheels "$wheels"
    elif [ -d "$wheels" ]; then
      install_wheels "$wheels"
    fi
    # the installed package, not this checkout's copy, is what runs (the wheel is what ships)
    exec "$PYTHON" -P scripts/gpu_check.py "$@"
    ;;
esac
