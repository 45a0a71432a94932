"""Export a live (training) Megatron model to a Hugging Face directory, at any TP/PP layout.

The streaming weight exporter of the rollout path gathers the HF-named tensors bucket by bucket
onto global rank 0, which writes them as safetensors shards; the directory appears atomically.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from megatron_gad.convert import atomic_output_dir
from megatron_gad.hf_io import ShardWriter, copy_aux_files, finish_shards, hf_output_config
from megatron_gad.io import remove_dir, replace_dir
from megatron_gad.rollout.base import DEFAULT_BUCKET_BYTES
from megatron_gad.rollout.weight_export import WeightExporter


def export_hf_from_chunks(
    chunks: list[torch.nn.Module],
    hf_config: Any,
    out_dir: str,
    aux_dir: str | None = None,
    *,
    role: str = "actor",
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 2**30,
    replace: bool = True,
) -> None:
    """Write ``chunks`` (this rank's stage) as an HF directory at ``out_dir`` (collective).

    ``aux_dir``: where tokenizer files are copied from. ``replace``: an existing ``out_dir`` is
    replaced once the new one is complete.
    """
    rank = dist.get_rank()
    final = os.path.abspath(out_dir)
    if not replace and os.path.exists(final):  # checked on every rank: none may enter the collectives
        raise FileExistsError(f"{final} exists (export with replace=True to overwrite it)")
    staging = f"{final}.new"
    if rank == 0:
        remove_dir(staging)
    dist.barrier()
    exporter = WeightExporter(chunks, hf_config, dtype=dtype, dst_ranks=(0,), role=role,
                              bucket_bytes=min(max_shard_bytes, DEFAULT_BUCKET_BYTES))
    with atomic_output_dir(staging) as tmp:
        writer = ShardWriter(tmp, "part", max_shard_bytes)
        for bucket in exporter.buckets():
            for name, tensor in bucket:
                if rank == 0:  # shards are staged in host memory, not on the accelerator
                    writer.add(name, tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous())
        if rank == 0:
            writer.flush()
            finish_shards(tmp, writer.files)
            hf_output_config(hf_config, role, dtype).save_pretrained(tmp)
            if aux_dir:
                copy_aux_files(aux_dir, tmp)
    if rank == 0:  # a kill at any point leaves a complete export: final, or final.old beside final.new
        replace_dir(staging, final)
    dist.barrier()

