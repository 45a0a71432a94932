"""Critic provider: a GPT trunk with a scalar head, and sequence scoring at the last response token.

The critic is the discriminator in GAD mode and the value model in PPO mode. Its trunk is a
``GPTModel`` built without post-processing (no vocab output layer at all); on the last pipeline
stage a :class:`ScalarHead` (final RMSNorm, then ``hidden -> 1``) is its own module. Forward returns
per-token scores ``[B, S]`` in fp32 on the last stage and hidden states elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megatron_gad.models.actor import gpt_stage
from megatron_gad.models.transformer import ModelArgs


class ScalarHead(torch.nn.Module):
    """Final RMSNorm and a ``hidden -> 1`` projection; replicated across TP ranks.

    HF names: ``model.norm.weight`` and ``score.weight`` (as ``*ForSequenceClassification`` with
    one label uses). Input ``[S, B, H]``; output ``[B, S]`` float32.

    ``score`` starts at zero: an untrained discriminator scores every sequence 0, so its first
    Bradley-Terry loss is exactly ln 2 and its accuracy 0.5 (ties count one half) instead of
    whatever a random projection of the trunk's features happens to prefer.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        kw = {"dtype": config.params_dtype}
        self.norm = torch.nn.RMSNorm(config.hidden_size, eps=config.layernorm_epsilon, **kw)
        self.score = torch.nn.Linear(config.hidden_size, 1, bias=False, **kw)
        torch.nn.init.zeros_(self.score.weight)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.score(self.norm(hidden)).squeeze(-1).transpose(0, 1).float()


def _megatron_module_base():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class CriticModel(_megatron_module_base()):
    """One pipeline stage of the critic: ``trunk`` (GPTModel, no output layer) + ``head`` on the
    last stage. Built on every rank by :func:`build_critic`."""

    def __init__(self, config: Any, args: ModelArgs, pre_process: bool, post_process: bool) -> None:
        from megatron.core.enums import ModelType

        super().__init__(config=config)
        # Attributes Megatron's schedules and finalize_model_grads read from a model chunk.
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.pre_process = pre_process
        self.post_process = post_process
        self.trunk = gpt_stage(config, args, pre_process, post_process, output_layer=False)
        self.head = ScalarHead(config) if post_process else None

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor]) -> None:
        """Pipeline hook: the activation received from the previous stage."""
        self.trunk.set_input_tensor(input_tensor)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.trunk(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        return self.head(hidden) if self.head is not None else hidden

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Trunk shards from GPTModel; the head is replicated (stored once, from TP rank 0)."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = self.trunk.sharded_state_dict(f"{prefix}trunk.", sharded_offsets, metadata)
        if self.head is not None:
            # tp_group must be explicit: megatron-core only falls back to the TP group when no DP
            # group is known either, and would otherwise mark every TP rank as the main replica.
            tp_group = ps.get_tensor_model_parallel_group()
            out.update(sharded_state_dict_default(
                self.head, f"{prefix}head.", sharded_offsets, metadata, tp_group=tp_group
            ))
        return out


def build_critic(config: Any, args: ModelArgs, pre_process: bool, post_process: bool) -> CriticModel:
    """Build this stage's critic (see :class:`CriticModel`)."""
    return CriticModel(config, args, pre_process, post_process)


def last_token_index(response_mask: Tensor, prompt_length: int) -> Tensor:
    """Position, in the ``[prompt | response]`` sequence, of each row's last valid response token.

    ``response_mask`` ``[B, R]`` (right-padded). Returns int64 ``[B]``. The score is read at that
    token itself (unshifted). For an empty response this is the last prompt token
    (``prompt_length - 1``): the critic's view of "nothing was answered", never index -1.
    """
    lengths = response_mask.long().sum(-1)
    return prompt_length - 1 + lengths


def sequence_scores(token_scores: Tensor, response_mask: Tensor, prompt_length: int) -> Tensor:
    """Gather one scalar per sequence from per-token scores ``[B, P + R]`` -> ``[B]``."""
    idx = last_token_index(response_mask, prompt_length)
    return token_scores.gather(1, idx.unsqueeze(1)).squeeze(1)


def place_at_last_token(scores: Tensor, response_mask: Tensor) -> Tensor:
    """Token rewards ``[B, R]``: zero everywhere except ``scores[b]`` at row b's last valid
    response token (a row with an empty response stays all zero)."""
    lengths = response_mask.long().sum(-1)
    out = torch.zeros(response_mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.nonzero(lengths > 0).squeeze(1)
    out[rows, lengths[rows] - 1] = scores[rows]
    return out
