"""Entry point: ``torchrun --nproc_per_node N examples/pretrain_gad.py``.

Until the GAD trainer lands this runs a short smoke training of the tiny actor on CPU: next-token
prediction on a repeating token pattern through Megatron's pipeline schedule, DDP and optimizer.
TP/PP come from the MGAD_TP / MGAD_PP environment variables (default 1).
"""

import os

import torch


def main() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from transformers import LlamaConfig

    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.build import OptimConfig, build_model, build_optimizer
    from megatron_gad.models.inputs import attention_mask_4d, position_ids_from_mask
    from megatron_gad.runtime import destroy_distributed, init_distributed

    tp, pp = int(os.environ.get("MGAD_TP", 1)), int(os.environ.get("MGAD_PP", 1))
    info = init_distributed(tp=tp, pp=pp)
    hf = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cfg = transformer_config_from_hf(hf, tp=tp, pp=pp)
    args = model_args_from_hf(hf)
    chunks = build_model(lambda pre, post: build_actor(cfg, args, pre, post), cfg)
    optimizer = build_optimizer(chunks, OptimConfig(lr=3e-3), cfg)
    seq = 24
    tokens = (torch.arange(8 * (seq + 1)).view(8, seq + 1) * 7 % 13 + 1)  # learnable pattern
    mask = torch.ones(8, seq, dtype=torch.long)

    def forward_step(data_iterator, model):
        ids, labels = next(data_iterator)
        out = model(input_ids=ids, position_ids=position_ids_from_mask(mask), attention_mask=attention_mask_4d(mask))

        def loss_func(logits):
            loss = vocab_parallel_cross_entropy(logits.float(), labels).mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    for step in range(30):
        optimizer.zero_grad()
        for chunk in chunks:
            chunk.zero_grad_buffer()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([(tokens[:, :-1], tokens[:, 1:])]),
            model=chunks, num_microbatches=1, seq_length=seq, micro_batch_size=8, forward_only=False,
        )
        optimizer.step()
        if ps.is_pipeline_last_stage() and info.tp_rank == 0 and info.dp_rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss {losses[0]['loss'].item():.4f}", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
