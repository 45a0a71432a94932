"""Model inputs shared by the actor and the critic: attention masks and position ids."""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_gad.data.batch import position_ids_from_mask

__all__ = ["attention_mask_4d", "position_ids_from_mask"]


def attention_mask_4d(attention_mask: Tensor) -> Tensor:
    """Megatron boolean attention mask ``[B, 1, S, S]`` (True = do not attend) from a 0/1 token
    mask ``[B, S]``: causal, and no attention to padding keys. Rows of padding queries are fully
    masked; their outputs are ignored by every loss."""
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]
    return ~(causal[None, None] & keys)
