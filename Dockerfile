# megatron_gad on an NVIDIA PyTorch (NGC) base: CUDA torch, Transformer Engine and apex come with
# the base image; we add megatron-core 0.16.1, this package and (optionally) vLLM.
#   docker build -t megatron_gad .
#   docker run --gpus all --ipc=host --rm megatron_gad \
#       torchrun --nproc_per_node 8 examples/pretrain_gad.py --config examples/configs/gad_gspo.yaml
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ARG INSTALL_VLLM=1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

WORKDIR /opt/megatron_gad
COPY setup.py README.md ./
COPY megatron_gad ./megatron_gad
# Keep the image's CUDA torch: the constraint file pins whatever version the base ships.
# vLLM wheels pin their own torch release; installing one over the image's build would break
# Transformer Engine and apex (compiled against it), so vLLM is installed under the same
# constraint and skipped, with a notice, when no supported vLLM release matches the base image.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt -e ".[test]" \
 && if [ "$INSTALL_VLLM" = "1" ]; then pip install --no-cache-dir -c /tmp/constraints.txt -e ".[vllm]" || \
      echo "NOTICE: no vLLM release in the supported range matches this image's torch; rollouts use" \
           "the built-in engine (actor_rollout_ref.rollout.name=cpu). Pick a BASE_IMAGE whose torch a" \
           "supported vLLM pins, or set INSTALL_VLLM=0 to silence this." ; fi
COPY examples ./examples
COPY checkpoint_tools ./checkpoint_tools
COPY benchmarks ./benchmarks
COPY tests ./tests
COPY pytest.ini ./

CMD ["python", "-c", "import megatron_gad, megatron.core; print('megatron_gad', megatron_gad.__version__, 'megatron-core', megatron.core.__version__)"]
