"""Data pipeline: parquet prompts (optionally with teacher responses) -> typed prompt batches.

The training mode is decided here, once: a dataset whose rows all carry a teacher response is
GAD data, one without any is standard data (:class:`Mode`); the :class:`PromptBatch` carries it.
``megatron_gad.data.demo`` makes the offline demo task, tokenizer and model configs.
"""

from megatron_gad.data.batch import (
    Mode,
    PromptBatch,
    PromptLoader,
    ResumableSampler,
    TokenizedRow,
    collate_rows,
    position_ids_from_mask,
)
from megatron_gad.data.config import DataConfig
from megatron_gad.data.dataset import DataError, DataStats, PromptDataset, build_loaders
from megatron_gad.data.demo import DemoAssets, demo_reward, ensure_demo_assets, generate_demo_assets

__all__ = [
    "DataConfig",
    "DataError",
    "DataStats",
    "DemoAssets",
    "Mode",
    "PromptBatch",
    "PromptDataset",
    "PromptLoader",
    "ResumableSampler",
    "TokenizedRow",
    "build_loaders",
    "collate_rows",
    "demo_reward",
    "ensure_demo_assets",
    "generate_demo_assets",
    "position_ids_from_mask",
]
