# megatron_gad on an NVIDIA PyTorch (NGC) base: CUDA torch, Transformer Engine and apex come with
# the base image; we add megatron-core 0.16.1, this package and (optionally) vLLM.
#   docker build -t megatron_gad .
#   docker run --gpus all --ipc=host --rm megatron_gad \
#       torchrun --nproc_per_node 8 examples/pretrain_gad.py --config examples/configs/gad_gspo.yaml
#
# Base: NGC PyTorch 25.12 (Python 3.12, CUDA 13.1), built from torch 2.10.0a0+b4e4ee81d3 (NVIDIA's
# "PyTorch Release 25.12" notes). Torch 2.10.0 is what vLLM 0.17.0 - 0.19.1 pin (their wheels'
# Requires-Dist: torch==2.10.0), so VLLM_VERSION defaults to 0.19.1, the newest of them. NGC builds
# carry a pre-release tag (2.10.0a0+...), which pip does not count as 2.10.0; vLLM is therefore
# installed without its torch/torchvision/torchaudio pins when the base's torch release (2.10.0)
# equals vLLM's pin (scripts/install_vllm.sh); otherwise the image has no vLLM, says so, and
# rollouts use the built-in engine.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ARG INSTALL_VLLM=1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

WORKDIR /opt/megatron_gad
COPY setup.py README.md ./
COPY megatron_gad ./megatron_gad
ARG VLLM_VERSION=0.19.1
# Keep the image's CUDA torch: the constraint file pins whatever version the base ships.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt -e ".[test]"
# vLLM wheels pin their own torch release; installing one over the image's build would break
# Transformer Engine and apex (compiled against it). So vLLM goes in only where its pin names the
# base's torch release, with its other requirements under the same constraint; anything that
# fails leaves the image without vLLM, with a notice (the build does not fail). Its compiled ops
# need a GPU to load: `pytest -m gpu` (or scripts/gpu_check.sh) checks them on the first GPU run.
COPY scripts/install_vllm.sh ./scripts/
RUN if [ "$INSTALL_VLLM" = "1" ]; then bash scripts/install_vllm.sh "$VLLM_VERSION" /tmp/constraints.txt; fi
COPY examples ./examples
COPY checkpoint_tools ./checkpoint_tools
COPY benchmarks ./benchmarks
COPY tests ./tests
COPY pytest.ini ./

CMD ["python", "-c", "import megatron_gad, megatron.core; print('megatron_gad', megatron_gad.__version__, 'megatron-core', megatron.core.__version__)"]
