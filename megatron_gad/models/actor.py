"""Actor (student policy) provider: one megatron-core ``GPTModel`` per pipeline stage."""

from __future__ import annotations

from typing import Any

from megatron_gad.models.transformer import ModelArgs, layer_spec

#: GPTModel's own default ``rope_scaling_factor``: passed when the HF config has no RoPE scaling,
#: where ``rope_scaling=False`` leaves it unused.
_UNUSED_ROPE_SCALING_FACTOR = 8.0


def gpt_stage(config: Any, args: ModelArgs, pre_process: bool, post_process: bool, output_layer: bool):
    """This stage's ``GPTModel`` (the actor's, or the critic's trunk with ``output_layer=False``:
    then the model has neither final norm nor vocab output layer, and returns hidden states)."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config),
        vocab_size=args.padded_vocab,
        max_sequence_length=args.max_positions,
        pre_process=pre_process,
        post_process=post_process and output_layer,
        parallel_output=True,
        share_embeddings_and_output_weights=args.tied and output_layer,
        position_embedding_type="rope",
        rotary_base=int(args.rotary_base),
        rope_scaling=args.rope_scaling_factor is not None,
        rope_scaling_factor=args.rope_scaling_factor or _UNUSED_ROPE_SCALING_FACTOR,
    )


def build_actor(config: Any, args: ModelArgs, pre_process: bool, post_process: bool):
    """Build this stage's ``GPTModel``: embeddings on the first stage (``pre_process``), the final
    norm and the vocab-parallel output layer on the last (``post_process``). Called on every rank.

    With ``args.tied`` the output layer shares the word embedding; at PP > 1
    megatron-core keeps a copy on the last stage and all-reduces its gradient with the first.
    Forward returns logits ``[B, S, padded_vocab / TP]`` on the last stage, hidden states on others.
    """
    return gpt_stage(config, args, pre_process, post_process, output_layer=True)
