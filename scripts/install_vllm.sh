#!/usr/bin/env bash
# Install vLLM VERSION next to an image's own torch build (used by the Dockerfile):
#   scripts/install_vllm.sh VERSION CONSTRAINTS_FILE
# vLLM pins one torch release (Requires-Dist: torch==X.Y.Z); NGC images carry pre-release builds
# (X.Y.Za0+commit) that pip does not count as X.Y.Z. When the image's torch release equals the pin,
# vLLM's other requirements are installed under CONSTRAINTS_FILE and vLLM itself without its
# torch/torchvision/torchaudio pins. Anything else prints a NOTICE and leaves vLLM out (exit 0), so
# the image still builds and rollouts use the built-in engine (actor_rollout_ref.rollout.name=cpu).
set -uo pipefail
version=$1
constraints=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
notice() {
  echo "NOTICE: vllm $version is not installed: $*; rollouts use the built-in engine" \
       "(actor_rollout_ref.rollout.name=cpu). Pick a BASE_IMAGE / VLLM_VERSION pair that agree" \
       "(see megatron_gad/rollout/vllm_engine.py), or set INSTALL_VLLM=0 to silence this."
  exit 0
}
pip download -q --no-cache-dir --no-deps -d "$work" "vllm==$version" || notice "download failed"
wheel=$(ls "$work"/vllm-*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || notice "no wheel for this platform"
meta=$(unzip -p "$wheel" '*.dist-info/METADATA') || notice "unreadable wheel"
pin=$(sed -n 's/^Requires-Dist: torch==\([^ ;]*\).*/\1/p' <<<"$meta" | head -1)
base=$(python -c "import torch; from packaging.version import Version; print(Version(torch.__version__).base_version)")
[ "$pin" = "$base" ] || notice "it pins torch==$pin, this image has torch $base"
sed -n 's/^Requires-Dist: //p' <<<"$meta" | grep -v 'extra ==' \
  | grep -v -E '^(torch|torchvision|torchaudio)([=<>!~ ;(]|$)' > "$work/requirements.txt"
pip install -q --no-cache-dir -c "$constraints" -r "$work/requirements.txt" || notice "its requirements conflict with the image"
pip install -q --no-cache-dir --no-deps "$wheel" || notice "install failed"
python -c "import vllm; from megatron_gad.rollout.vllm_engine import check_vllm_version; check_vllm_version(vllm.__version__)" \
  || { pip uninstall -y -q vllm; notice "it does not import here"; }
echo "vllm $version installed against torch $(python -c 'import torch; print(torch.__version__)')"
