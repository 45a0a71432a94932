"""Actor (student policy) provider: one megatron-core ``GPTModel`` per pipeline stage, and the
window of sequence positions its output layer computes logits at."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

from megatron_gad.models.transformer import ModelArgs, layer_spec

#: The positions ``[start, stop)`` of the sequence the actor's output layer computes logits at
#: (None: every position); set by :func:`logits_at`.
_LOGIT_WINDOW: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("logit_window", default=None)

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
    Forward returns logits ``[B, S, padded_vocab / TP]`` on the last stage, hidden states on others;
    inside :func:`logits_at` the logits cover that window's positions only, ``[B, stop - start, ...]``.
    """
    model = gpt_stage(config, args, pre_process, post_process, output_layer=True)
    if post_process:
        model.output_layer.register_forward_pre_hook(_window_hidden_states, with_kwargs=True)
    return model


@contextlib.contextmanager
def logits_at(window: tuple[int, int] | None) -> Iterator[None]:
    """Within: the actor's output layer computes logits at the sequence positions
    ``[start, stop)`` of ``window`` only (None: at every position). The final norm and every
    layer still run over the whole sequence; only the vocabulary projection, and so the logits
    and the log-softmax over them, skip the positions no loss reads (a log-prob of a response
    needs the logits from the position before its first token on). The gradient is the same:
    logits never computed get none."""
    token = _LOGIT_WINDOW.set(window)
    try:
        yield
    finally:
        _LOGIT_WINDOW.reset(token)


def _window_hidden_states(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of the output layer: its input ``[S, B, H]`` cut to the window's positions."""
    window = _LOGIT_WINDOW.get()
    if window is None:
        return None
    if module.sequence_parallel:  # the input would be this rank's slice of the sequence
        raise RuntimeError("logits_at does not support sequence parallelism")
    (hidden, *rest) = args
    start, stop = window
    if not 0 <= start < stop <= hidden.shape[0]:
        raise ValueError(f"logit window [{start}, {stop}) outside the sequence of {hidden.shape[0]} positions")
    return (hidden[start:stop], *rest), kwargs
