"""megatron_gad: Generative Adversarial Distillation (GAD) with GSPO on megatron-core.

The package is import-light on purpose: ``import megatron_gad`` pulls in neither megatron-core
nor transformers. Import the sub-packages you need (``megatron_gad.losses`` is pure torch).
"""

__version__ = "0.1.0"
