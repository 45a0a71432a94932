"""Hugging Face <-> Megatron tensor names and layouts for Llama, Mistral, Qwen2 and Qwen3.

One place for the mapping used by the checkpoint converters (:mod:`megatron_gad.convert`) and the
rollout weight exporter. Pure tensor code: no process groups, no Megatron imports.

Megatron names are the GLOBAL names of an unsharded (TP=1, PP=1) model, as
:func:`megatron_gad.models.sharding.full_tensors` yields them from any TP/PP layout:

==========================================================  ===========================================
Megatron (actor; the critic trunk adds the ``trunk.`` prefix) Hugging Face
==========================================================  ===========================================
``embedding.word_embeddings.weight`` [padded_vocab, h]      ``model.embed_tokens.weight`` [vocab, h]
``decoder.layers.i.input_layernorm.weight``                  ``model.layers.i.input_layernorm.weight``
``decoder.layers.i.self_attention.linear_qkv.weight``        ``model.layers.i.self_attn.{q,k,v}_proj.weight``
``decoder.layers.i.self_attention.linear_qkv.bias`` (qwen2)  ``model.layers.i.self_attn.{q,k,v}_proj.bias``
``decoder.layers.i.self_attention.{q,k}_layernorm.weight``   ``model.layers.i.self_attn.{q,k}_norm.weight``
``decoder.layers.i.self_attention.linear_proj.weight``       ``model.layers.i.self_attn.o_proj.weight``
``decoder.layers.i.pre_mlp_layernorm.weight``                ``model.layers.i.post_attention_layernorm.weight``
``decoder.layers.i.mlp.linear_fc1.weight`` [gate; up]        ``model.layers.i.mlp.{gate,up}_proj.weight``
``decoder.layers.i.mlp.linear_fc2.weight``                   ``model.layers.i.mlp.down_proj.weight``
``decoder.final_layernorm.weight`` (actor)                   ``model.norm.weight``
``output_layer.weight`` (untied actor only)                  ``lm_head.weight`` [vocab, h]
``head.norm.weight`` (critic)                                ``model.norm.weight``
``head.score.weight`` [1, h] (critic)                        ``score.weight`` [1, h]
==========================================================  ===========================================

The critic's HF form is that of ``*ForSequenceClassification`` with ``num_labels=1``: the
``model.*`` trunk, ``model.norm.weight`` and ``score.weight``. With Transformer Engine the input
and pre-MLP norms are fused into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``;
both spellings are understood, and :func:`hf_to_megatron_state` produces the one the model built
by :func:`megatron_gad.models.transformer.layer_spec` uses.

Fused QKV layout, per query group g (GQA): ``[q_g (heads/groups * head_dim rows), k_g, v_g]``
for g = 0 .. groups-1. Fused fc1: ``[gate; up]`` along the output dimension. The vocabulary is
padded with zero rows to ``ModelArgs.padded_vocab``; export drops those rows.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from megatron_gad.errors import UserError
from megatron_gad.models.transformer import ModelArgs, model_args_from_hf, use_transformer_engine

ROLES = ("actor", "critic")
_LAYER = re.compile(r"^(?P<pre>(?:trunk\.)?decoder\.layers\.)(?P<i>\d+)\.(?P<rest>.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


class MappingError(UserError, ValueError):
    """A tensor name, shape or key set that does not fit the model's mapping."""


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise MappingError(f"role {role!r} is not one of {ROLES}")


# ----------------------------------------------------------------------------------------------
# Expected names and shapes
# ----------------------------------------------------------------------------------------------


def _hf_layer_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Within-layer HF suffix -> shape of ``model.layers.i.<suffix>``."""
    h, q, kv = args.hidden, args.heads * args.head_dim, args.groups * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (args.ffn, h),
        "mlp.up_proj.weight": (args.ffn, h),
        "mlp.down_proj.weight": (h, args.ffn),
    }
    if args.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if args.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (args.head_dim,), "self_attn.k_norm.weight": (args.head_dim,)})
    return shapes


def _hf_top_shapes(args: ModelArgs, role: str) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (args.vocab, args.hidden), "model.norm.weight": (args.hidden,)}
    if role == "critic":
        out["score.weight"] = (1, args.hidden)
    elif not args.tied:
        out["lm_head.weight"] = (args.vocab, args.hidden)
    return out


def hf_shape(name: str, args: ModelArgs, role: str = "actor") -> tuple[int, ...]:
    """Expected shape of one HF tensor of this model; raises MappingError for an unknown name."""
    m = _HF_LAYER.match(name)
    shape = None
    if m and int(m.group("i")) < args.layers:
        shape = _hf_layer_shapes(args).get(m.group("rest"))
    else:
        shape = _hf_top_shapes(args, role).get(name)
    if shape is None:
        raise MappingError(f"unknown HF tensor {name!r} for a {args.architecture} {role}")
    return shape


def hf_expected_shapes(hf_config: Any, role: str = "actor") -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of a complete checkpoint of this role (what ``save_pretrained``
    writes: no ``lm_head.weight`` when embeddings are tied; the critic has ``score.weight``)."""
    _check_role(role)
    args = model_args_from_hf(hf_config)
    out: dict[str, tuple[int, ...]] = {}
    for i in range(args.layers):
        for suffix, shape in _hf_layer_shapes(args).items():
            out[f"model.layers.{i}.{suffix}"] = shape
    out.update(_hf_top_shapes(args, role))
    return out


def megatron_names(hf_config: Any, role: str = "actor", te: bool | None = None) -> list[str]:
    """Global Megatron parameter names of the unsharded model (TP=1, PP=1), in model order.

    ``te`` selects Transformer Engine's fused-norm names; None follows
    :func:`megatron_gad.models.transformer.use_transformer_engine`.
    """
    _check_role(role)
    args = model_args_from_hf(hf_config)
    te = use_transformer_engine() if te is None else te
    pre = "trunk." if role == "critic" else ""
    names = [pre + "embedding.word_embeddings.weight"]
    for i in range(args.layers):
        p = f"{pre}decoder.layers.{i}."
        attn = ["self_attention.linear_proj.weight", "self_attention.linear_qkv.weight"]
        attn += ["self_attention.linear_qkv.bias"] if args.qkv_bias else []
        attn += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"] if args.qk_norm else []
        mlp = ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
        if te:
            attn.append("self_attention.linear_qkv.layer_norm_weight")
            mlp.append("mlp.linear_fc1.layer_norm_weight")
            names += [p + n for n in attn + mlp]
        else:
            names += [p + n for n in ["input_layernorm.weight", *attn, "pre_mlp_layernorm.weight", *mlp]]
    if role == "critic":
        return names + ["head.norm.weight", "head.score.weight"]
    names.append("decoder.final_layernorm.weight")
    return names if args.tied else names + ["output_layer.weight"]


# ----------------------------------------------------------------------------------------------
# Tensor transforms (fuse / split)
# ----------------------------------------------------------------------------------------------


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, args: ModelArgs) -> Tensor:
    """HF q/k/v projections (weights ``[n*d, h]`` or biases ``[n*d]``) -> Megatron fused QKV in
    per-query-group order ``[q_g, k_g, v_g]``; shape ``[(heads + 2*groups) * d, ...]``."""
    tail = q.shape[1:]
    qg = q.reshape(args.groups, args.q_per_group * args.head_dim, *tail)
    kg = k.reshape(args.groups, args.head_dim, *tail)
    vg = v.reshape(args.groups, args.head_dim, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail)


def split_qkv(qkv: Tensor, args: ModelArgs) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`: fused ``[(heads + 2*groups) * d, ...]`` -> (q, k, v)."""
    tail = qkv.shape[1:]
    per = (args.q_per_group + 2) * args.head_dim
    g = qkv.reshape(args.groups, per, *tail)
    qd = args.q_per_group * args.head_dim
    q = g[:, :qd].reshape(-1, *tail)
    k = g[:, qd : qd + args.head_dim].reshape(-1, *tail)
    v = g[:, qd + args.head_dim :].reshape(-1, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def pad_vocab(weight: Tensor, args: ModelArgs) -> Tensor:
    """``[vocab, h]`` -> ``[padded_vocab, h]`` with zero rows appended."""
    extra = args.padded_vocab - weight.shape[0]
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


# ----------------------------------------------------------------------------------------------
# HF -> Megatron
# ----------------------------------------------------------------------------------------------


def _layer_rule(rest: str) -> tuple[list[str], str] | None:
    """Within-layer Megatron suffix -> (HF suffixes, how to combine them)."""
    rest = _TE_NORMS.get(rest, rest)
    rules: dict[str, tuple[list[str], str]] = {
        "input_layernorm.weight": (["input_layernorm.weight"], "copy"),
        "self_attention.linear_qkv.weight": ([f"self_attn.{x}_proj.weight" for x in "qkv"], "qkv"),
        "self_attention.linear_qkv.bias": ([f"self_attn.{x}_proj.bias" for x in "qkv"], "qkv"),
        "self_attention.q_layernorm.weight": (["self_attn.q_norm.weight"], "copy"),
        "self_attention.k_layernorm.weight": (["self_attn.k_norm.weight"], "copy"),
        "self_attention.linear_proj.weight": (["self_attn.o_proj.weight"], "copy"),
        "pre_mlp_layernorm.weight": (["post_attention_layernorm.weight"], "copy"),
        "mlp.linear_fc1.weight": (["mlp.gate_proj.weight", "mlp.up_proj.weight"], "cat"),
        "mlp.linear_fc2.weight": (["mlp.down_proj.weight"], "copy"),
    }
    return rules.get(rest)


def hf_sources(name: str, hf_config: Any, role: str = "actor", args: ModelArgs | None = None) -> tuple[list[str], str]:
    """The HF tensor names a global Megatron tensor is built from, and the combine rule
    (``copy``, ``qkv``, ``cat`` (fc1), ``vocab`` (pad rows) or ``none`` (tied output layer)).
    ``args``: ``model_args_from_hf(hf_config)`` when the caller has it (a loop over every tensor
    derives it once). Raises MappingError for a name that is not part of this model."""
    _check_role(role)
    args = args or model_args_from_hf(hf_config)
    pre = "trunk." if role == "critic" else ""
    m = _LAYER.match(name)
    if m and m.group("pre") == pre + "decoder.layers." and int(m.group("i")) < args.layers:
        rule = _layer_rule(m.group("rest"))
        if rule is not None:
            return [f"model.layers.{m.group('i')}.{s}" for s in rule[0]], rule[1]
    top: dict[str, tuple[list[str], str]] = {pre + "embedding.word_embeddings.weight": (["model.embed_tokens.weight"], "vocab")}
    if role == "critic":
        top["head.norm.weight"] = (["model.norm.weight"], "copy")
        top["head.score.weight"] = (["score.weight"], "copy")
    else:
        top["decoder.final_layernorm.weight"] = (["model.norm.weight"], "copy")
        top["output_layer.weight"] = ([], "none") if args.tied else (["lm_head.weight"], "vocab")
    if name not in top:
        raise MappingError(f"unknown Megatron tensor {name!r} for a {args.architecture} {role}")
    return top[name]


def megatron_tensor_from_hf(
    name: str, get: Callable[[str], Tensor], hf_config: Any, role: str = "actor", args: ModelArgs | None = None
) -> Tensor | None:
    """Build one full Megatron tensor from HF tensors fetched lazily with ``get(hf_name)``.

    Returns None for the tied output layer (it shares the word embedding). Shapes are checked
    against the config; a mismatch raises MappingError naming the HF tensor. ``args``: the
    config's :func:`model_args_from_hf` (a loop over every tensor passes it, deriving it once).
    """
    args = args or model_args_from_hf(hf_config)
    parts, how = hf_parts(name, get, hf_config, role, args)
    if how == "none":
        return None
    if how == "qkv":
        return fuse_qkv(*parts, args)
    if how == "cat":
        return torch.cat(parts, dim=0)
    if how == "vocab":
        return pad_vocab(parts[0], args)
    return parts[0]


def hf_parts(name: str, get: Callable[[str], Tensor], hf_config: Any, role: str,
             args: ModelArgs) -> tuple[list[Tensor], str]:
    """The HF tensors global Megatron tensor ``name`` is built from, fetched with ``get`` and
    each checked against its shape from the config (MappingError naming the HF tensor), and
    the combine rule (:func:`hf_sources`; ``none``: no tensors)."""
    sources, how = hf_sources(name, hf_config, role, args)
    if how == "none":
        return [], how
    parts = []
    for src in sources:
        t = get(src)
        if tuple(t.shape) != hf_shape(src, args, role):
            raise MappingError(f"tensor {src!r} has shape {tuple(t.shape)}, expected {hf_shape(src, args, role)}")
        parts.append(t)
    return parts, how


def hf_to_megatron_state(
    hf_state: Mapping[str, Tensor], hf_config: Any, role: str = "actor"
) -> dict[str, Tensor]:
    """Full HF state dict -> full (TP=1, PP=1) Megatron state dict with global names.

    Vocab rows are padded with zeros to ``model_args_from_hf(hf_config).padded_vocab``; q/k/v
    are fused per query group and gate/up into fc1; with tied embeddings there is no
    ``output_layer.weight`` (an ``lm_head.weight`` in ``hf_state`` is then ignored). For
    ``role="critic"`` names carry the ``trunk.`` prefix and the head is ``head.norm.weight``
    (from ``model.norm.weight``) and ``head.score.weight`` (from ``score.weight`` ``[1, hidden]``).
    Raises MappingError naming missing, unexpected or mis-shaped tensors.
    """
    check_hf_keys(hf_state.keys(), hf_config, role)
    out: dict[str, Tensor] = {}
    args = model_args_from_hf(hf_config)
    for name in megatron_names(hf_config, role):
        t = megatron_tensor_from_hf(name, hf_state.__getitem__, hf_config, role, args)
        if t is not None:
            out[name] = t
    return out


def check_hf_keys(keys: Any, hf_config: Any, role: str = "actor") -> None:
    """Raise MappingError naming missing and unexpected HF tensors (a tied ``lm_head.weight`` is
    tolerated; rotary ``inv_freq`` buffers are ignored)."""
    expected = set(hf_expected_shapes(hf_config, role))
    given = {k for k in keys if not k.endswith("rotary_emb.inv_freq")}
    if model_args_from_hf(hf_config).tied or role == "critic":
        given.discard("lm_head.weight")
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:5])}")
        raise MappingError(f"HF checkpoint does not match the {role} of its config: " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# Megatron -> HF
# ----------------------------------------------------------------------------------------------


def megatron_to_hf_tensors(
    name: str, full: Tensor, hf_config: Any, role: str = "actor", args: ModelArgs | None = None
) -> list[tuple[str, Tensor]]:
    """One full (TP-gathered) Megatron tensor under its GLOBAL name -> its HF-named tensors.

    Splits the fused QKV per query group into ``q_proj``/``k_proj``/``v_proj``, fc1 into
    ``gate_proj``/``up_proj``, removes the vocab padding rows; returns [] for
    ``output_layer.weight`` when embeddings are tied. Raises MappingError (a ValueError) naming
    an unknown tensor or a tensor whose shape does not fit the config. ``args``: as for
    :func:`hf_sources`. Any rank may call it.
    """
    args = args or model_args_from_hf(hf_config)
    sources, how = hf_sources(name, hf_config, role, args)
    if how == "none":
        return []
    if how == "qkv":
        parts = list(split_qkv(_checked(name, full, (args.heads + 2 * args.groups) * args.head_dim), args))
    elif how == "cat":
        parts = list(_checked(name, full, 2 * args.ffn).chunk(2, dim=0))
    elif how == "vocab":
        parts = [_checked(name, full, args.padded_vocab)[: args.vocab]]
    else:
        parts = [full]
    return named_hf_parts(name, tuple(full.shape), sources, parts, args, role)


def named_hf_parts(name: str, shape: tuple[int, ...], sources: list[str], parts: list[Tensor], args: ModelArgs,
                   role: str) -> list[tuple[str, Tensor]]:
    """``[(hf_name, part)]`` of the Megatron tensor ``name`` (of ``shape``) split into ``parts``,
    each checked against its HF shape from the config (MappingError naming both)."""
    for src, t in zip(sources, parts):
        if tuple(t.shape) != hf_shape(src, args, role):
            raise MappingError(
                f"Megatron tensor {name!r} has shape {tuple(shape)}: does not fit {src!r} {hf_shape(src, args, role)}"
            )
    return list(zip(sources, parts))


def _checked(name: str, full: Tensor, rows: int) -> Tensor:
    if full.dim() == 0 or full.shape[0] != rows:
        raise MappingError(f"Megatron tensor {name!r} has shape {tuple(full.shape)}, expected {rows} rows")
    return full
