"""Checkpoint conversion between Hugging Face directories and Megatron ``dist_checkpointing``.

The CLIs in ``checkpoint_tools/`` are thin wrappers around this module:

- :func:`hf_to_megatron` reads ``config.json`` + safetensors (one file, shards with an index, or
  shards without one) or ``pytorch_model*.bin``, builds this rank's (TP/PP-sharded) model stage
  for its sharded state dict only, puts the lazily read HF tensors (this rank's TP slices) into
  that state dict in place of the parameters (:func:`hf_sharded_state_dict`) and saves it with
  ``dist_checkpointing.save``. The Megatron directory also gets the HF ``config.json``, tokenizer
  files and ``megatron_gad_meta.json`` (role, architecture, dtype) so it can be turned back into
  HF form without the source directory.
- :func:`megatron_to_hf` reads each pipeline stage's tensors straight from the checkpoint,
  without building a model (:func:`read_stage_hf_tensors`), maps them to HF names and writes
  safetensors shards (one writer per pipeline stage) plus an index when there is more than one
  file.
- :func:`verify_logits` runs the HF model and the Megatron model on the same random tokens.

Every function taking a model or a checkpoint's tensors is collective (all ranks, after
``init_distributed``); the ``preflight_*`` checks are cheap, local and run before any process
group exists. Output is written to ``<out>.tmp-<pid>``, flushed to disk and renamed at the end: a
failure leaves no output directory, and a crash no torn one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_gad.errors import UserError
from megatron_gad.io import fsync_path, fsync_tree
from megatron_gad.hf_io import (  # noqa: F401  (re-exported for the CLIs and tests)
    INDEX_FILE,
    MEGATRON_META_FILE,
    ConversionError,
    SafetensorsReader,
    ShardWriter,
    copy_aux_files,
    finish_shards,
    hf_output_config,
    locate_safetensors,
    parse_size,
    read_hf_config,
)
from megatron_gad.models import hf_mapping as hfm
from megatron_gad.models.sharding import is_fused_fc1
from megatron_gad.models.transformer import model_args_from_hf, transformer_config_from_hf


# ----------------------------------------------------------------------------------------------
# Preflight checks (local, before any process group)
# ----------------------------------------------------------------------------------------------


def preflight_hf(
    hf_dir: str, role: str, tp: int = 1, pp: int = 1, init_score_head: float | None = None
) -> tuple[Any, SafetensorsReader]:
    """Check an HF directory for conversion at TP x PP without reading tensor data: config,
    architecture, layout divisibility, the exact tensor key set and every shape. Raises
    ConversionError / MappingError / UnsupportedModelError with a one-line message.

    ``init_score_head`` (critic only): read a ``*ForCausalLM`` checkpoint as a critic whose
    ``score.weight`` is drawn from N(0, init_score_head^2) (GAD initialises the discriminator
    from the generator plus a scalar head)."""
    config = read_hf_config(hf_dir)
    _check_layout(config, tp, pp)
    reader = SafetensorsReader(hf_dir)
    if init_score_head is not None:
        if role != "critic":
            raise ConversionError("--init-score-head applies to --role critic only")
        reader.add_critic_head(init_score_head)
    elif role == "critic" and "score.weight" not in reader.files:
        raise ConversionError(f"{hf_dir!r} has no score.weight (a causal LM, not a critic): add --init-score-head 0 "
                              "to drop lm_head and start from a zero scalar head, as the trainer starts GAD's "
                              "discriminator (the student plus a scalar head); a positive STD draws it from N(0, STD^2)")
    hfm.check_hf_keys(reader.keys(), config, role)
    for name, shape in hfm.hf_expected_shapes(config, role).items():
        if reader.shape(name) != shape:
            raise hfm.MappingError(f"tensor {name!r} has shape {reader.shape(name)}, expected {shape} (from config.json)")
    return config, reader


def _check_layout(config: Any, tp: int, pp: int) -> None:
    try:
        transformer_config_from_hf(config, tp=tp, pp=pp, params_dtype=torch.float32)
    except ValueError as e:
        raise ConversionError(f"TP={tp} x PP={pp} cannot divide the model: {e}") from None


# ----------------------------------------------------------------------------------------------
# Output directories and models
# ----------------------------------------------------------------------------------------------


def check_output_free(out: str) -> None:
    """Raise ConversionError when the output path already exists (checked before any work)."""
    if os.path.exists(out):
        raise ConversionError(f"output {out!r} already exists")


def is_main_rank() -> bool:
    """True on global rank 0 (or without a process group): the rank that prints summaries."""
    return _rank() == 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def atomic_output_dir(out: str) -> Iterator[str]:
    """Yield a temporary directory ``<out>.tmp-<pid of rank 0>`` (collective); it becomes ``out``
    when the block succeeds on every rank and is removed by whichever rank the block raises on
    (a failing rank's peers are typically blocked in a collective until torchrun kills them).
    Before the rename rank 0 flushes every file and directory of it to disk, and after it the
    parent directory, so ``out`` is never a torn directory after a crash."""
    check_output_free(out)
    pid = [os.getpid()]
    if dist.is_initialized():
        dist.broadcast_object_list(pid, src=0)
    tmp = f"{os.path.abspath(out)}.tmp-{pid[0]}"
    if _rank() == 0:
        os.makedirs(tmp)
    _barrier()
    try:
        yield tmp
        _barrier()
        if _rank() == 0:
            fsync_tree(tmp)
            os.rename(tmp, out)
            fsync_path(os.path.dirname(os.path.abspath(out)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_stage(config: Any, role: str, dtype: torch.dtype) -> torch.nn.Module:
    """This rank's stage of the actor or critic at the current TP/PP layout (collective)."""
    from megatron.core import parallel_state as ps

    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.critic import build_critic

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    # No parameter's initial value is ever read (hf_to_megatron saves the HF tensors in their
    # place; fill_stage_from_hf and load_stage overwrite them), so nothing needs one. With CPU initialisation megatron-core would still build each TP layer's full
    # fp32 "master weight", cast it, split it and copy a slice (about half of a conversion's CPU
    # time); perform_initialization=False skips that, and _set_tp_attributes then sets the TP
    # attributes megatron-core sets only while initialising. On CUDA the init methods are no-ops.
    no_init = {k: _no_init for k in ("init_method", "output_layer_init_method", "embedding_init_method")}
    cpu_init = not torch.cuda.is_available()
    args = model_args_from_hf(config)
    cfg = args.transformer_config(tp, pp, dtype, **no_init, **({"perform_initialization": False} if cpu_init else {}))
    builder = build_actor if role == "actor" else build_critic
    model = builder(cfg, args, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    if cpu_init:
        _set_tp_attributes(model)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def _set_tp_attributes(model: torch.nn.Module) -> None:
    """Mark the weights of megatron-core's TP layers as its ``_initialize_affine_weight_cpu`` does
    (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``), for a model built with
    ``perform_initialization=False``: column-parallel weights and the vocab-parallel embedding
    are split along dim 0, row-parallel weights along dim 1; the gated ``linear_fc1`` has stride
    2 (``transformer/mlp.py``), every other layer 1. Column-parallel biases are marked by
    megatron-core either way. ``tests/convert`` checks the result against a default build."""
    from megatron.core.tensor_parallel import layers

    split_dim = ((layers.ColumnParallelLinear, 0), (layers.RowParallelLinear, 1), (layers.VocabParallelEmbedding, 0))
    for name, module in model.named_modules():
        dim = next((d for cls, d in split_dim if isinstance(module, cls)), None)
        weight = getattr(module, "weight", None)
        if dim is None or weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        gated_fc1 = name.endswith("linear_fc1") and bool(getattr(module.config, "gated_linear_unit", False))
        layers.set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=2 if gated_fc1 else 1)


def _no_init(weight: Tensor) -> None:
    """Initialisation method that leaves ``weight`` as allocated."""


def _progress(iterable: Any, desc: str, total: int | None = None) -> Any:
    from tqdm import tqdm

    from megatron_gad.quiet import progress_enabled

    return tqdm(iterable, desc=desc, total=total, unit="tensor", disable=not progress_enabled(_rank()), leave=False)


# ----------------------------------------------------------------------------------------------
# HF -> Megatron
# ----------------------------------------------------------------------------------------------


def shard_for_rank(name: str, full: Tensor, param: Tensor, tp: int, tp_rank: int) -> Tensor:
    """This TP rank's slice of the full tensor ``name`` for ``param`` (split along
    ``param.partition_dim``; fc1 takes ``[gate_r; up_r]``); raises MappingError on a shape
    mismatch. Replicated parameters get ``full``."""
    from megatron_gad.models.sharding import is_tp_sharded

    part = full
    if tp > 1 and is_tp_sharded(param):
        dim = int(param.partition_dim)
        if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
            gate, up = full.chunk(2, dim=dim)
            part = torch.cat([gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim)
        else:
            part = full.chunk(tp, dim=dim)[tp_rank]
    if part.shape != param.shape:
        raise hfm.MappingError(f"tensor {name!r}: slice {tuple(part.shape)} does not fit parameter {tuple(param.shape)}")
    return part


def _counting_get(reader: SafetensorsReader) -> tuple[Callable[[str], Tensor], Callable[[], int]]:
    """``(get, read)``: ``get(name)`` reads an HF tensor from ``reader``, ``read()`` the bytes read so far."""
    nbytes = [0]

    def get(name: str) -> Tensor:
        t = reader.get(name)
        nbytes[0] += t.numel() * t.element_size()
        return t

    return get, lambda: nbytes[0]


def _param_from_hf(name: str, param: Tensor, get: Callable[[str], Tensor], config: Any, role: str, args: Any,
                   tp: int, tp_rank: int) -> Tensor:
    """This TP rank's slice for ``param`` (global name ``name``) from the HF tensors (the tied
    output layer of a last stage at PP > 1 takes the word embedding)."""
    full = hfm.megatron_tensor_from_hf(name, get, config, role, args)
    if full is None:  # tied output layer on the last stage (PP > 1)
        full = hfm.megatron_tensor_from_hf("embedding.word_embeddings.weight", get, config, role, args)
    return shard_for_rank(name, full, param, tp, tp_rank)


def fill_stage_from_hf(model: torch.nn.Module, reader: SafetensorsReader, config: Any, role: str) -> int:
    """Copy every parameter of this rank's stage from the HF tensors (TP slice; the tied output
    layer of a last stage at PP > 1 takes the word embedding). Returns the bytes read."""
    from megatron.core import parallel_state as ps

    from megatron_gad.models.sharding import global_name, layer_offset

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    offset = layer_offset(model)
    get, read = _counting_get(reader)

    params = list(model.named_parameters())
    args = model_args_from_hf(config)
    with torch.no_grad():
        for local, param in _progress(params, "hf -> megatron"):
            param.copy_(_param_from_hf(global_name(local, offset), param, get, config, role, args, tp, tp_rank))
    return read()


def hf_sharded_state_dict(model: torch.nn.Module, reader: SafetensorsReader, config: Any, role: str) -> tuple[dict, int]:
    """The sharded state dict megatron-core saves for this rank's stage (its keys, offsets,
    replica ids and dtypes: ``model.sharded_state_dict()``), with every tensor's data taken from
    the HF tensors instead of the parameters, which stay unwritten: no copy into the model, and
    the fused fc1 saved from the HF gate and up projections as they are (megatron-core's factory
    would concatenate them into the parameter and copy its halves out again). Returns the state
    dict and the bytes read. Raises MappingError on a tensor that does not fit."""
    from dataclasses import replace

    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_gad.models.sharding import global_name, is_tp_sharded, layer_offset

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    offset, params = layer_offset(model), dict(model.named_parameters())
    args = model_args_from_hf(config)
    get, read = _counting_get(reader)

    def with_data(sh: ShardedTensor, data: Tensor) -> ShardedTensor:
        return replace(sh, data=data.to(sh.dtype))  # megatron-core checks shape and dtype again

    state = model.sharded_state_dict()
    for key, sh in _progress(list(state.items()), "hf -> megatron"):
        if key not in params:  # _extra_state objects: saved as the model has them
            continue
        name, param = global_name(key, offset), params[key]
        if isinstance(sh, ShardedTensorFactory) and is_fused_fc1(name):
            gate_up, _ = hfm.hf_parts(name, get, config, role, args)
            halves = [t.chunk(tp, dim=int(param.partition_dim))[tp_rank] if tp > 1 and is_tp_sharded(param) else t
                      for t in gate_up]
            state[key] = [with_data(part, half) for part, half in zip(sh.build(), halves)]  # [gate, up]
            continue
        if not isinstance(sh, ShardedTensor):
            raise ConversionError(f"cannot save {key!r}: megatron-core describes it as {type(sh).__name__}")
        state[key] = with_data(sh, _param_from_hf(name, param, get, config, role, args, tp, tp_rank))
    return state, read()


@contextlib.contextmanager
def _torch_save_without_crc32() -> Iterator[None]:
    """``torch.save`` without the CRC32 of each zip record inside the block. The checkpoint
    writer stores every tensor as one ``torch.save`` record, and the checksum was about a third
    of ``hf_to_megatron``'s CPU time (~3 GB/s), while nothing reads it: ``torch.load`` (and so
    ``dist_checkpointing.load``, the trainer and ``verify.py``) never checks it. What is lost: a
    zip tool testing a ``.distcp`` file (it sees only the last of the records appended there)
    reports a bad CRC. The trainer's own checkpoints keep their checksums."""
    from torch import serialization

    previous = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        yield
    finally:
        serialization.set_crc32_options(previous)


def hf_to_megatron(hf_dir: str, out: str, role: str = "actor", dtype: torch.dtype | None = None,
                   init_score_head: float | None = None) -> dict:
    """Convert an HF directory into a Megatron checkpoint at ``out`` (collective, any TP/PP).

    ``dtype`` of the saved parameters defaults to the HF tensors' dtype; ``init_score_head``
    as in :func:`preflight_hf`. Returns a summary (bytes read on this rank, number of
    parameters). Raises ConversionError / MappingError."""
    config, reader = preflight_hf(hf_dir, role, *_layout(), init_score_head=init_score_head)
    dtype = dtype or reader.get("model.norm.weight").dtype
    with atomic_output_dir(out) as tmp:
        from megatron.core import dist_checkpointing

        model = build_stage(config, role, dtype)
        state, nbytes = hf_sharded_state_dict(model, reader, config, role)
        with _torch_save_without_crc32():
            dist_checkpointing.save(state, tmp)
        if _rank() == 0:
            config.save_pretrained(tmp)
            copy_aux_files(hf_dir, tmp)
            meta = {"format": 1, "role": role, "architecture": config.model_type, "dtype": str(dtype).removeprefix("torch.")}
            with open(os.path.join(tmp, MEGATRON_META_FILE), "w") as f:
                json.dump(meta, f, indent=1)
    return {"bytes_read": nbytes, "params": sum(p.numel() for p in model.parameters())}


def _layout() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


# ----------------------------------------------------------------------------------------------
# Megatron -> HF
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MegatronMeta:
    """What ``megatron_gad_meta.json`` records about a converted checkpoint."""

    role: str
    architecture: str
    dtype: torch.dtype


def preflight_megatron(megatron_dir: str, tp: int = 1, pp: int = 1) -> tuple[Any, MegatronMeta]:
    """Check a Megatron directory written by :func:`hf_to_megatron` (config, meta, checkpoint
    metadata: the stored tensors are those of the config's model; layout divisibility) without
    loading tensors. Raises ConversionError."""
    config = read_hf_config(megatron_dir)
    meta_path = os.path.join(megatron_dir, MEGATRON_META_FILE)
    if not os.path.isfile(meta_path):
        raise ConversionError(f"{megatron_dir!r} has no {MEGATRON_META_FILE} (not written by hf_to_megatron)")
    if not os.path.isfile(os.path.join(megatron_dir, "metadata.json")):
        raise ConversionError(f"{megatron_dir!r} has no dist_checkpointing metadata.json")
    try:
        with open(meta_path) as f:
            raw = json.load(f)
    except ValueError as exc:
        raise ConversionError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("role") not in hfm.ROLES:
        raise ConversionError(f"{meta_path}: role {raw.get('role')!r} is not one of {hfm.ROLES}")
    _check_layout(config, tp, pp)
    stored_tensors_by_stage(megatron_dir, config, raw["role"], pp)  # the stored tensors fit config.json
    return config, MegatronMeta(raw["role"], raw["architecture"], getattr(torch, raw.get("dtype", "float32")))


def load_stage(megatron_dir: str, config: Any, role: str, dtype: torch.dtype) -> torch.nn.Module:
    """Build this rank's stage and load the checkpoint into it (collective)."""
    from megatron_gad.checkpoint import load_model

    model = build_stage(config, role, dtype)
    load_model([model], megatron_dir)
    return model


_STORED_LAYER = re.compile(r"^(?P<pre>(?:trunk\.)?decoder\.layers\.)(?P<rest>.+)$")


@dataclass(frozen=True)
class StoredTensor:
    """One global Megatron tensor as a ``dist_checkpointing`` checkpoint stores it: the
    transformer layers' tensors are stacked under one key with a leading layer axis."""

    name: str  # the global Megatron name (``decoder.layers.3.mlp.linear_fc1.weight``)
    key: str  # the checkpoint key (``decoder.layers.mlp.linear_fc1.weight``)
    layer: int | None  # index along the stored layer axis; None for a tensor without one
    layers: int  # length of that axis (1 without one)
    shape: tuple[int, ...]  # the tensor's shape (one layer's)
    stored_dtype: torch.dtype


def stored_tensors_by_stage(megatron_dir: str, config: Any, role: str, pp: int) -> list[list[StoredTensor]]:
    """The checkpoint's tensors from its metadata alone (no tensor data, no model), in model
    order, split into ``pp`` writer stages: stage ``p`` takes the transformer layers
    ``[p * L / pp, (p + 1) * L / pp)``, stage 0 the embedding, the last stage everything else.
    Raises ConversionError when the stored key set or a layer axis does not fit ``config``."""
    from megatron.core import dist_checkpointing

    args = model_args_from_hf(config)
    expected = hfm.megatron_names(config, role, te=True)  # the checkpoint spells the norms as TE does
    found: dict[str, StoredTensor] = {}
    try:
        metadata = dist_checkpointing.load_tensors_metadata(megatron_dir)
    except Exception as exc:  # a torn or foreign .metadata file: pickle, key and I/O errors alike
        raise ConversionError(f"{megatron_dir!r}: the dist_checkpointing metadata cannot be read: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    for key, sh in metadata.items():
        shape, m = tuple(sh.global_shape), _STORED_LAYER.match(key)
        if m is None:
            found[key] = StoredTensor(key, key, None, 1, shape, sh.dtype)
            continue
        if not shape or shape[0] != args.layers:
            raise ConversionError(f"{megatron_dir!r}: tensor {key!r} has shape {shape}, expected {args.layers} "
                                  "layers first (from config.json)")
        for i in range(args.layers):
            name = f"{m.group('pre')}{i}.{m.group('rest')}"
            found[name] = StoredTensor(name, key, i, args.layers, shape[1:], sh.dtype)
    missing, extra = [n for n in expected if n not in found], sorted(set(found) - set(expected))
    if missing or extra:
        raise ConversionError(f"{megatron_dir!r} does not hold the {role} of its config.json: missing "
                              f"{missing[:3] or 'none'}, unexpected {extra[:3] or 'none'}")
    per_stage = args.layers // pp
    stages: list[list[StoredTensor]] = [[] for _ in range(pp)]
    for name in expected:
        t = found[name]
        stage = t.layer // per_stage if t.layer is not None else 0 if "embedding." in name else pp - 1
        stages[stage].append(t)
    return stages


def _chunks(tensors: list[StoredTensor], max_bytes: int | None, dtype: torch.dtype) -> list[list[StoredTensor]]:
    """``tensors`` in order, cut into runs of at most ``max_bytes`` (one tensor at least), each
    tensor counted at the larger of its stored and its output ``dtype`` (the reader fills a
    buffer of the stored dtype, then the request's tensor of the output one)."""
    out: list[list[StoredTensor]] = []
    size = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * max(t.stored_dtype.itemsize, dtype.itemsize)
        if not out or (max_bytes is not None and size + nbytes > max_bytes):
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


def _sharded_request(t: StoredTensor, dtype: torch.dtype) -> dict[str, Any]:
    """What to load for ``t`` into new ``dtype`` tensors, as ``dist_checkpointing`` ShardedTensors
    (the stored layer axis prepended as the model's own sharded state dict does). The fused fc1
    is requested as its two halves, ``[gate; up]`` of the stored tensor at any TP layout: they are
    the HF gate and up projections as they are, without a concatenation and a split."""
    from megatron.core.dist_checkpointing import ShardedTensor

    layer = () if t.layer is None else ((0, t.layer, t.layers),)
    prepend = len(layer)
    if is_fused_fc1(t.name):
        half = (t.shape[0] // 2, *t.shape[1:])
        return {f"{t.name}#{part}": ShardedTensor.from_rank_offsets(
                    t.key, torch.empty(half, dtype=dtype), *layer, (prepend, index, 2), prepend_axis_num=prepend)
                for index, part in enumerate(("gate", "up"))}
    return {t.name: ShardedTensor.from_rank_offsets(t.key, torch.empty(t.shape, dtype=dtype), *layer,
                                                    prepend_axis_num=prepend)}


def _hf_tensors(t: StoredTensor, loaded: dict[str, Tensor], config: Any, role: str,
                args: Any) -> list[tuple[str, Tensor]]:
    """The HF-named tensors of one loaded stored tensor (shapes checked against ``config``, whose
    :func:`model_args_from_hf` is ``args``)."""
    if not is_fused_fc1(t.name):
        return hfm.megatron_to_hf_tensors(t.name, loaded[t.name], config, role, args)
    sources, _ = hfm.hf_sources(t.name, config, role, args)
    return hfm.named_hf_parts(t.name, t.shape, sources, [loaded[f"{t.name}#gate"], loaded[f"{t.name}#up"]], args, role)


def read_stage_hf_tensors(megatron_dir: str, config: Any, role: str, dtype: torch.dtype,
                          max_bytes: int | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield, on the writer rank of each pipeline stage (TP rank 0, DP rank 0), that stage's HF
    tensors in ``dtype`` read straight from the checkpoint, without building a model: megatron-
    core's ``dist_checkpointing.load`` of ShardedTensors over plain tensors, made from the
    checkpoint's metadata (:func:`stored_tensors_by_stage`). With more than one rank the stage is
    read in loads of at most ``max_bytes`` (so memory stays about one output shard); one rank
    reads it in one load, as a built model would hold it (megatron-core's conversion to torch's
    ShardedTensor places the other layers of a partly requested tensor on "another rank", which
    is this one when it is alone). Collective: every rank iterates (the others take part in each
    load with nothing to read and yield nothing)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    args = model_args_from_hf(config)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        max_bytes = None
    per_stage = [_chunks(tensors, max_bytes, dtype) for tensors in stored_tensors_by_stage(megatron_dir, config, role, pp)]
    mine = per_stage[stage] if writer else []
    total = sum(len(chunk) for chunk in mine)
    with _progress(None, "megatron -> hf", total=total) as bar:
        for index in range(max(len(chunks) for chunks in per_stage)):  # the same number of loads on every rank
            chunk = mine[index] if index < len(mine) else []
            request = {k: v for t in chunk for k, v in _sharded_request(t, dtype).items()}
            loaded = dist_checkpointing.load(request, megatron_dir, validate_access_integrity=False)
            for t in chunk:
                yield from _hf_tensors(t, loaded, config, role, args)
                bar.update()


def _writable(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype`` as safetensors writes it: contiguous and alone on its storage. A
    tensor that already is (a loaded tensor, a split q/k/v, a cast) is written as it is; a view
    that shares a storage (the real rows of a padded vocabulary) is copied."""
    tensor = tensor.to(dtype)
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def megatron_to_hf(megatron_dir: str, out: str, max_shard_size: str | int | None = "5GB",
                   dtype: torch.dtype | None = None) -> dict:
    """Convert a Megatron checkpoint written by :func:`hf_to_megatron` to an HF directory
    (collective, any TP/PP; the TP-rank-0, DP-rank-0 rank of every stage reads that stage's
    tensors from the checkpoint (:func:`read_stage_hf_tensors`, no model is built) and writes its
    shards). Returns a summary with the bytes this rank wrote."""
    from megatron.core import parallel_state as ps

    config, meta = preflight_megatron(megatron_dir, *_layout())
    dtype = dtype or meta.dtype
    max_bytes = parse_size(max_shard_size)
    with atomic_output_dir(out) as tmp:
        writer = ShardWriter(tmp, f"part-{ps.get_pipeline_model_parallel_rank():05d}", max_bytes)
        for name, tensor in read_stage_hf_tensors(megatron_dir, config, meta.role, dtype, max_bytes):
            writer.add(name, _writable(tensor, dtype))
        writer.flush()
        files: list = [writer.files]
        if dist.is_initialized():
            files = [None] * dist.get_world_size()
            dist.all_gather_object(files, writer.files)
        if _rank() == 0:
            finish_shards(tmp, [f for per_rank in files for f in per_rank])
            hf_output_config(config, meta.role, dtype).save_pretrained(tmp)
            copy_aux_files(megatron_dir, tmp)
    return {"bytes_written": sum(b for _, _, b in writer.files)}


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------


def load_hf_model(hf_dir: str, role: str) -> torch.nn.Module:
    """The transformers model of ``hf_dir`` in fp32 (``*ForCausalLM``, or
    ``*ForSequenceClassification`` with one label for the critic), from any safetensors layout
    (also shards without an index, which ``from_pretrained`` does not read)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config, reader = preflight_hf(hf_dir, role)
    if role == "critic":
        config.num_labels = 1
    auto = AutoModelForCausalLM if role == "actor" else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=torch.float32)
    state = {name: reader.get(name).float() for name in hfm.hf_expected_shapes(config, role)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_ok = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied_ok or unexpected:
        raise hfm.MappingError(f"{hf_dir!r} does not load into {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    return model.eval()


def hf_reference_outputs(hf_dir: str, role: str, ids: Tensor) -> Tensor:
    """HF model outputs in fp32: logits ``[B, S, vocab]`` (actor) or per-token scores ``[B, S]``
    (critic: ``score(model(ids).last_hidden_state)``, the hidden state after the final norm)."""
    model = load_hf_model(hf_dir, role)
    with torch.no_grad():
        if role == "actor":
            return model(input_ids=ids).logits.float()
        return model.score(model.model(input_ids=ids).last_hidden_state).squeeze(-1).float()


def megatron_outputs(model: torch.nn.Module, ids: Tensor) -> Tensor | None:
    """Forward ``ids`` ``[B, S]`` through the pipeline (collective). Returns, on last-stage ranks,
    TP-gathered logits ``[B, S, padded_vocab]`` (actor) or scores ``[B, S]`` (critic); None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gad.models.inputs import attention_mask_4d, position_ids_from_mask

    mask = torch.ones_like(ids)
    dev = next(model.parameters()).device
    outputs: list[Tensor] = []

    def forward_step(data_iterator: Iterator, chunk: torch.nn.Module) -> tuple:
        batch = next(data_iterator).to(dev)
        out = chunk(input_ids=batch, position_ids=position_ids_from_mask(mask).to(dev),
                    attention_mask=attention_mask_4d(mask).to(dev))

        def loss_func(output: Tensor) -> tuple:
            if output.dim() == 3:
                output = tensor_parallel.gather_from_tensor_model_parallel_region(output)
            outputs.append(output.detach().float().cpu())
            return output.sum() * 0.0, {}

        return out, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([ids]), model=[model], num_microbatches=1,
            seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True,
        )
    return outputs[0] if ps.is_pipeline_last_stage() else None


def verify_logits(hf_dir: str, megatron_dir: str, batch: int = 2, seq: int = 16, seed: int = 0) -> float:
    """Max absolute difference between HF and Megatron outputs (fp32) on the same random tokens,
    over the real vocab columns (collective; every rank returns the same value)."""
    config, meta = preflight_megatron(megatron_dir, *_layout())
    hf_config = read_hf_config(hf_dir)
    vocab = int(hf_config.vocab_size)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    model = load_stage(megatron_dir, config, meta.role, torch.float32)
    got = megatron_outputs(model, ids)
    diff = torch.zeros((), device=next(model.parameters()).device)  # NCCL reduces device tensors only
    if got is not None:
        ref = hf_reference_outputs(hf_dir, meta.role, ids)
        got = got[..., :vocab] if meta.role == "actor" else got
        diff += (got.float().cpu() - ref.float()).abs().max().to(diff.device)
    if dist.is_initialized():
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


# ----------------------------------------------------------------------------------------------
# CLI runner
# ----------------------------------------------------------------------------------------------


def run_cli(preflight: Callable[[], Any], work: Callable[[], int], tp: int = 1, pp: int = 1) -> int:
    """Run a converter CLI on this process (one process, or one torchrun rank): ``preflight()``
    before any process group, then ``init_distributed(tp, pp)``, ``work()`` and teardown.
    A user error, or an OSError (a full disk, a read-only output directory), prints
    ``error: <message>`` on one line to stderr and returns 2."""
    import signal
    import sys

    from megatron_gad.runtime.distributed import destroy_distributed, init_distributed

    from megatron_gad.quiet import quiet_third_party

    quiet_third_party()
    # torchrun stops the other ranks with SIGTERM when one fails: unwind so temporary output goes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        preflight()
        init_distributed(tp=tp, pp=pp)
        try:
            return work()
        finally:
            destroy_distributed()
    except (UserError, OSError) as e:  # ConversionError, MappingError, ...; a full disk; others keep their traceback
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
