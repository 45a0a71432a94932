"""Hugging Face directory I/O for the converters and the trainer: config, weights read lazily by
tensor name (safetensors: single file, shards with an index, shards without one; PyTorch
``pytorch_model.bin``: single file or shards, loaded with ``torch.load(weights_only=True)``),
sharded safetensors writing, the exported config and the tokenizer files that travel with a
checkpoint. Local (no process groups).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
from typing import Any

import torch
from torch import Tensor

from megatron_gad.errors import UserError
from megatron_gad.io import fsync_path
from megatron_gad.models import hf_mapping as hfm
from megatron_gad.models.transformer import model_args_from_hf

INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


class ConversionError(UserError, ValueError):
    """A user-caused problem with a conversion's inputs or outputs (the CLIs exit 2 on it)."""


def read_hf_config(directory: str) -> Any:
    """``AutoConfig`` of ``directory``; ConversionError when the directory or config is missing,
    UnsupportedModelError for an architecture we cannot build."""
    from transformers import AutoConfig

    if not os.path.isdir(directory):
        raise ConversionError(f"directory {directory!r} does not exist")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ConversionError(f"{directory!r} has no config.json")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:  # malformed JSON, unknown model_type, ...
        raise ConversionError(f"{os.path.join(directory, 'config.json')} cannot be read: {exc}") from None
    model_args_from_hf(config)
    return config


def _read_weight_map(index: str, hf_dir: str, kind: str) -> dict[str, str]:
    """``weight_map`` of a ``*.index.json`` file as tensor name -> file path (files must exist)."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConversionError(f"{index} is not a {kind} index (a JSON object with weight_map): {exc!r}") from None
    for file in files:
        if not os.path.isfile(os.path.join(hf_dir, file)):
            raise ConversionError(f"{os.path.basename(index)} names {file!r}, which does not exist in {hf_dir!r}")
    return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}


def _names_by_file(files: list[str], open_file: Any, handles: dict[str, Any] | None = None) -> dict[str, str]:
    """Tensor name -> file over ``files`` (each opened with ``open_file``); names must not repeat.
    The opened handles are kept in ``handles`` (path -> handle) when given, so a reader does not
    open a file a second time (a ``.bin`` file is a whole ``torch.load``)."""
    out: dict[str, str] = {}
    for path in files:
        handle = open_file(path)
        if handles is not None:
            handles[path] = handle
        for name in handle.keys():
            if name in out:
                raise ConversionError(f"tensor {name!r} appears in both {out[name]!r} and {path!r}")
            out[name] = path
    return out


def locate_safetensors(hf_dir: str, handles: dict[str, Any] | None = None) -> dict[str, str]:
    """HF tensor name -> safetensors file path: from ``model.safetensors.index.json`` when present,
    else ``model.safetensors``, else every ``*.safetensors`` file (names must not repeat; the
    files opened to list them are kept in ``handles`` when given)."""

    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        return _read_weight_map(index, hf_dir, "safetensors")
    single = os.path.join(hf_dir, "model.safetensors")
    files = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise ConversionError(f"{hf_dir!r} has no *.safetensors files")
    return _names_by_file(files, _open_safetensors, handles)


def _open_safetensors(path: str) -> Any:
    """``safe_open(path)``; ConversionError naming the file when it is not a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as exc:
        raise ConversionError(f"{path} is not a readable safetensors file: {exc}") from None


def _bin_files(hf_dir: str) -> list[str]:
    """``pytorch_model.bin``, else the ``pytorch_model-*.bin`` shards, of ``hf_dir``."""
    single = os.path.join(hf_dir, BIN_FILE)
    if os.path.isfile(single):
        return [single]
    return sorted(glob.glob(os.path.join(hf_dir, "pytorch_model-*.bin")))


def weight_format(hf_dir: str) -> str | None:
    """``"safetensors"``, ``"bin"`` (PyTorch pickles) or None when ``hf_dir`` holds no HF weights.
    safetensors win when both are present (as in transformers)."""
    if os.path.isfile(os.path.join(hf_dir, INDEX_FILE)) or glob.glob(os.path.join(hf_dir, "*.safetensors")):
        return "safetensors"
    if os.path.isfile(os.path.join(hf_dir, BIN_INDEX_FILE)) or _bin_files(hf_dir):
        return "bin"
    return None


def locate_weights(hf_dir: str, handles: dict[str, Any] | None = None) -> dict[str, str]:
    """HF tensor name -> weight file path, safetensors first (:func:`locate_safetensors`), else
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin`` or ``pytorch_model-*.bin`` shards.
    ConversionError "no weights found in DIR" when there are none. Files opened to list their
    names (no index) are kept in ``handles`` (path -> handle) when given."""
    kind = weight_format(hf_dir)
    if kind == "safetensors":
        return locate_safetensors(hf_dir, handles)
    if kind is None:
        raise ConversionError(f"no weights found in {hf_dir} (expected model.safetensors, *.safetensors "
                              f"shards, {BIN_FILE} or pytorch_model-*.bin shards)")
    index = os.path.join(hf_dir, BIN_INDEX_FILE)
    if os.path.isfile(index):
        return _read_weight_map(index, hf_dir, "PyTorch weights")
    return _names_by_file(_bin_files(hf_dir), _open_bin, handles)


class _BinFile:
    """A ``pytorch_model*.bin`` state dict behind the part of safetensors' ``safe_open`` API the
    reader uses (``keys``, ``get_tensor``, ``get_slice(...).get_shape()``). Loaded memory-mapped
    with ``weights_only=True``: no code from the file runs, and tensors are paged in when read."""

    def __init__(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # not a zip archive: legacy format, cannot be memory-mapped
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise ConversionError(f"{path} is not a readable PyTorch weights file: {exc}") from None
            state = self._load_plain(path)
        except Exception as exc:  # pickle errors of every kind, a refused global, a truncated file
            raise ConversionError(f"{path} is not a readable PyTorch weights file: "
                                  f"{' '.join(str(exc).split())[:300]}") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ConversionError(f"{path} does not hold a state dict of tensors")
        self.state: dict[str, Tensor] = state

    @staticmethod
    def _load_plain(path: str) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConversionError(f"{path} is not a readable PyTorch weights file: "
                                  f"{' '.join(str(exc).split())[:300]}") from None

    def keys(self) -> list[str]:
        return list(self.state)

    def get_tensor(self, name: str) -> Tensor:
        return self.state[name]

    def get_slice(self, name: str) -> "_BinFile._Slice":
        return self._Slice(self.state[name])

    class _Slice:
        def __init__(self, tensor: Tensor) -> None:
            self.tensor = tensor

        def get_shape(self) -> list[int]:
            return list(self.tensor.shape)


def _open_bin(path: str) -> _BinFile:
    return _BinFile(path)


def _open_weights(path: str) -> Any:
    """A name-addressed handle on one weight file (safetensors or PyTorch ``.bin``)."""
    return _open_bin(path) if path.endswith(".bin") else _open_safetensors(path)


class SafetensorsReader:
    """Lazy, name-addressed access to an HF directory's weights (any rank): safetensors, or
    ``pytorch_model*.bin`` files when the directory has no safetensors (:func:`locate_weights`)."""

    def __init__(self, hf_dir: str) -> None:
        self._handles: dict[str, Any] = {}  # path -> open file; listing the names may open some
        self.files = locate_weights(hf_dir, self._handles)
        self.synthetic: dict[str, Tensor] = {}

    def keys(self) -> list[str]:
        """Every tensor name (file tensors and synthetic ones)."""
        return [*self.files, *self.synthetic]

    def add_critic_head(self, std: float, seed: int = 0) -> None:
        """Read a ``*ForCausalLM`` checkpoint as a critic: drop ``lm_head.weight`` and add a
        ``score.weight`` ``[1, hidden]`` drawn from N(0, std^2) with ``seed`` (the same tensor on
        every rank; ``std=0``: a zero head, the trainer's choice). Raises ConversionError when the
        checkpoint already has ``score.weight``."""
        if "score.weight" in self.files:
            raise ConversionError("the HF checkpoint already has score.weight: drop --init-score-head")
        self.files.pop("lm_head.weight", None)
        norm = self.get("model.norm.weight")
        g = torch.Generator().manual_seed(seed)
        self.synthetic["score.weight"] = (torch.randn(1, norm.shape[0], generator=g) * std).to(norm.dtype)

    def _handle(self, name: str) -> Any:
        if name not in self.files:
            raise hfm.MappingError(f"tensor {name!r} is missing from the HF checkpoint")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = _open_weights(path)
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header, without reading the data."""
        if name in self.synthetic:
            return tuple(self.synthetic[name].shape)
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        """Read one tensor."""
        if name in self.synthetic:
            return self.synthetic[name]
        return self._handle(name).get_tensor(name)


def copy_aux_files(src: str, dst: str) -> None:
    """Copy the tokenizer and generation files of ``src`` that exist into ``dst``."""
    for name in AUX_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def parse_size(text: str | int | None) -> int | None:
    """``"500MB"``, ``"5GB"``, ``"123"`` (bytes) -> bytes; None stays None (no sharding)."""
    if text is None or isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    s = text.strip().upper()
    for unit, scale in units.items():
        if s.endswith(unit):
            s, mult = s[: -len(unit)], scale
            break
    else:
        mult = 1
    try:
        return int(float(s) * mult)
    except ValueError:
        raise ConversionError(f"--max-shard-size {text!r} is not a size like 500MB or 5GB") from None


class ShardWriter:
    """Write HF tensors into safetensors files of at most ``max_bytes`` each (one writer rank);
    each file is flushed to disk once written."""

    def __init__(self, directory: str, prefix: str, max_bytes: int | None) -> None:
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str], int]] = []  # (file name, tensor names, bytes)

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.max_bytes is not None and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file(self.pending, os.path.join(self.directory, file), metadata={"format": "pt"})
        fsync_path(os.path.join(self.directory, file))  # by the rank that wrote it (any node)
        self.files.append((file, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0


def finish_shards(directory: str, files: list[tuple[str, list[str], int]]) -> None:
    """Rank 0: rename the writers' files to ``model.safetensors`` or ``model-0000i-of-0000n`` and
    write the index when there is more than one."""
    if len(files) == 1:
        os.rename(os.path.join(directory, files[0][0]), os.path.join(directory, "model.safetensors"))
        return
    weight_map, total = {}, 0
    for i, (file, names, nbytes) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(os.path.join(directory, file), os.path.join(directory, final))
        weight_map.update({n: final for n in names})
        total += nbytes
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)


def hf_output_config(config: Any, role: str, dtype: torch.dtype) -> Any:
    """A copy of ``config`` for the exported directory: ``<Arch>ForCausalLM`` for the actor,
    ``<Arch>ForSequenceClassification`` with ``num_labels=1`` for the critic."""
    out = copy.deepcopy(config)
    prefix = CLASS_PREFIX[config.model_type]
    out.architectures = [f"{prefix}ForCausalLM" if role == "actor" else f"{prefix}ForSequenceClassification"]
    if role == "critic":
        out.num_labels = 1
    out.dtype = dtype
    return out


MEGATRON_META_FILE = "megatron_gad_meta.json"


def megatron_checkpoint_role(directory: str) -> str | None:
    """The role recorded in a Megatron checkpoint written by ``hf_to_megatron.py`` (its
    ``megatron_gad_meta.json`` next to the dist-checkpoint ``metadata.json``); None for any other
    directory. ConversionError when the meta file is unreadable."""
    meta = os.path.join(directory, MEGATRON_META_FILE)
    if not os.path.isfile(meta):
        return None
    try:
        with open(meta) as f:
            role = json.load(f)["role"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{meta} cannot be read: {exc!r}") from None
    if not os.path.isfile(os.path.join(directory, "metadata.json")):
        raise ConversionError(f"{directory!r} has {MEGATRON_META_FILE} but no dist_checkpointing metadata.json "
                              "(an incomplete conversion?)")
    return str(role)


def check_model_weights(directory: str, key: str, role: str, random_init: bool) -> str:
    """Where a role's initial weights come from, checked before any model is built (local, any
    rank): ``"random"`` (only when the config asks: ``random_init``), ``"megatron"`` (a checkpoint
    written by ``hf_to_megatron.py`` for the same role), ``"safetensors"`` or ``"bin"``.

    Raises ConversionError naming the config ``key``: "no weights found in DIR" for a directory
    with only a config, and a Megatron checkpoint converted for the other role (a critic from an
    actor checkpoint needs ``--role critic --init-score-head``)."""
    if random_init:
        return "random"
    role_of_checkpoint = megatron_checkpoint_role(directory)
    if role_of_checkpoint is not None:
        if role_of_checkpoint != role:
            hint = (" --role critic --init-score-head 0 (the discriminator starts as the student plus a zero "
                    "scalar head), or give the HF directory" if role == "critic" else " --role actor")
            raise ConversionError(f"{key}={directory!r} is a Megatron {role_of_checkpoint} checkpoint, but the "
                                  f"{role} needs a {role} one: convert with hf_to_megatron.py{hint}")
        return "megatron"
    kind = weight_format(directory)
    if kind is None:
        random_key = key.rsplit(".", 1)[0] + ".random_init"
        raise ConversionError(f"{key}: no weights found in {directory} (expected *.safetensors, "
                              f"pytorch_model*.bin or a Megatron checkpoint from hf_to_megatron.py; set "
                              f"{random_key}=true to start from random weights)")
    return kind
