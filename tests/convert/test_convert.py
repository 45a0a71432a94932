"""HF <-> Megatron conversion on real tiny models: logit parity at TP=1, TP=2, PP=2 (fp32, the
real vocab columns only), bit-exact round trips with exact HF key sets, conversions run at
TP=2 x PP=2, and the critic's ``score.weight`` head at TP=2.

Every HF model is built by transformers with random weights (norms and biases randomised too, so a
swapped norm or bias mapping cannot hide behind ones and zeros), vocab 200 (padded to 256), GQA.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from safetensors.torch import load_file

from megatron_gad.runtime.spawn import run_distributed

# Import the heavy modules once here: forked ranks inherit them instead of importing per rank.
import megatron.core.dist_checkpointing  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.pipeline_parallel  # noqa: E402,F401
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402,F401

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

VOCAB, TOL = 200, 1e-4


def make_hf_dir(path: str, arch: str, tied: bool, role: str = "actor", layers: int = 2) -> str:
    """Save a random tiny ``arch`` model (CausalLM, or SequenceClassification(num_labels=1) for
    the critic) with ``save_pretrained`` into ``path``; returns ``path``."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                              MistralConfig, Qwen2Config, Qwen3Config)

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    extra = {"head_dim": 24} if arch == "qwen3" else {}  # head_dim != hidden / heads
    config = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 tie_word_embeddings=tied, rms_norm_eps=1e-6, **extra)
    torch.manual_seed(zlib.crc32(f"{arch}{tied}{role}".encode()))
    if role == "critic":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def _convert(hf_dir: str, meg_dir: str, role: str) -> dict:
    from megatron_gad.convert import hf_to_megatron

    return hf_to_megatron(hf_dir, meg_dir, role=role)


def _export(meg_dir: str, out: str, max_shard_size: str | None = "5GB") -> dict:
    from megatron_gad.convert import megatron_to_hf

    return megatron_to_hf(meg_dir, out, max_shard_size=max_shard_size)


def _verify(hf_dir: str, meg_dir: str) -> float:
    from megatron_gad.convert import verify_logits

    return verify_logits(hf_dir, meg_dir, batch=2, seq=12)


def _contract_check(hf_dir: str, meg_dir: str, role: str) -> None:
    """The contract function equals what the converter saved, name for name and bit for bit;
    names equal the real model's parameters; vocab padding rows are zero."""
    from transformers import AutoConfig

    from megatron_gad.convert import load_stage
    from megatron_gad.models.hf_mapping import hf_to_megatron_state
    from megatron_gad.models.sharding import full_tensors

    config = AutoConfig.from_pretrained(hf_dir)
    expected = hf_to_megatron_state(read_hf_dir(hf_dir), config, role)
    got = dict(full_tensors(load_stage(meg_dir, config, role, torch.float32)))
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    emb = expected[("trunk." if role == "critic" else "") + "embedding.word_embeddings.weight"]
    assert emb.shape[0] == 256 and not emb[VOCAB:].any()


def read_hf_dir(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory's safetensors files."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def assert_bit_exact(src: str, dst: str) -> None:
    a, b = read_hf_dir(src), read_hf_dir(dst)
    assert set(a) == set(b), f"key sets differ: {set(a) ^ set(b)}"
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


CASES = [(arch, tied) for arch in ("llama", "qwen2", "qwen3") for tied in (True, False)] + [("mistral", False)]


@pytest.mark.parametrize("arch,tied", CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def test_logit_parity_and_round_trip(arch: str, tied: bool, tmp_path) -> None:
    hf_dir = make_hf_dir(str(tmp_path / "hf"), arch, tied)
    meg, back = str(tmp_path / "meg"), str(tmp_path / "back")
    run_distributed(_convert, 1, args=(hf_dir, meg, "actor"))
    run_distributed(_contract_check, 1, args=(hf_dir, meg, "actor"))
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        diffs = run_distributed(_verify, tp * pp, tp=tp, pp=pp, args=(hf_dir, meg))
        assert max(diffs) <= TOL, f"{arch} TP={tp} PP={pp}: max abs logit diff {max(diffs):.2e}"
    run_distributed(_export, 1, args=(meg, back))
    assert_bit_exact(hf_dir, back)
    assert sorted(os.listdir(back)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_tp2_pp2_conversions_and_sharded_export(tmp_path) -> None:
    """Tied Llama (first and last stage both hold the embedding at PP=2): convert at TP=2 x PP=2,
    export at TP=2 x PP=2 into several shards with an index and at TP=1; both are bit-exact and
    load with AutoModelForCausalLM without missing or unexpected keys."""
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf_dir(str(tmp_path / "hf"), "llama", True, layers=4)
    meg = str(tmp_path / "meg")
    run_distributed(_convert, 4, tp=2, pp=2, args=(hf_dir, meg, "actor"))
    sharded, single = str(tmp_path / "sharded"), str(tmp_path / "single")
    run_distributed(_export, 4, tp=2, pp=2, args=(meg, sharded, "60KB"))
    run_distributed(_export, 1, args=(meg, single))
    assert_bit_exact(hf_dir, sharded)
    assert_bit_exact(hf_dir, single)
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 2 and os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    model, info = AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_critic_score_head_tp2_round_trip(tmp_path) -> None:
    """A SequenceClassification(num_labels=1) checkpoint as the critic: per-token scores match
    HF at TP=2 (the [1, hidden] head is replicated), and the export round-trips bit-exactly to a
    directory AutoModelForSequenceClassification loads with the same key set."""
    from transformers import AutoModelForSequenceClassification

    hf_dir = make_hf_dir(str(tmp_path / "hf"), "qwen2", False, role="critic")
    meg, back = str(tmp_path / "meg"), str(tmp_path / "back")
    run_distributed(_convert, 2, tp=2, args=(hf_dir, meg, "critic"))
    run_distributed(_contract_check, 1, args=(hf_dir, meg, "critic"))
    diffs = run_distributed(_verify, 2, tp=2, args=(hf_dir, meg))
    assert max(diffs) <= TOL, f"critic TP=2: max abs score diff {max(diffs):.2e}"
    run_distributed(_export, 1, args=(meg, back))
    assert_bit_exact(hf_dir, back)
    run_distributed(_export, 2, tp=2, args=(meg, str(tmp_path / "back_tp2"), "20KB"))
    assert_bit_exact(hf_dir, str(tmp_path / "back_tp2"))
    model, info = AutoModelForSequenceClassification.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_labels == 1 and model.config.architectures == ["Qwen2ForSequenceClassification"]


def _convert_with_head(hf_dir: str, meg_dir: str) -> None:
    from megatron_gad.convert import hf_to_megatron

    hf_to_megatron(hf_dir, meg_dir, role="critic", init_score_head=0.02)


def test_critic_from_causal_lm_with_new_score_head(tmp_path) -> None:
    """GAD's discriminator starts as the generator plus a scalar head: a CausalLM checkpoint
    converted with init_score_head keeps every trunk tensor and gains a N(0, 0.02^2) score."""
    hf_dir = make_hf_dir(str(tmp_path / "hf"), "llama", True)
    meg, back = str(tmp_path / "meg"), str(tmp_path / "back")
    run_distributed(_convert_with_head, 1, args=(hf_dir, meg))
    run_distributed(_export, 1, args=(meg, back))
    src, got = read_hf_dir(hf_dir), read_hf_dir(back)
    assert set(got) == set(src) | {"score.weight"}
    assert all(torch.equal(got[k], src[k]) for k in src)
    assert got["score.weight"].shape == (1, 64) and 0.01 < got["score.weight"].std() < 0.03


def _tp_attributes(hf_dir: str) -> list[bool]:
    """Per role: the converter's build (no initialisation, TP attributes set afterwards) marks
    every parameter exactly as megatron-core's own initialising build does."""
    from megatron.core import parallel_state as ps

    from megatron_gad.convert import build_stage, read_hf_config
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.critic import build_critic
    from megatron_gad.models.transformer import model_args_from_hf, transformer_config_from_hf

    config = read_hf_config(hf_dir)
    keys = ("tensor_model_parallel", "partition_dim", "partition_stride")
    same = []
    for role, builder in (("actor", build_actor), ("critic", build_critic)):
        cfg = transformer_config_from_hf(config, tp=2, pp=1, params_dtype=torch.float32)
        reference = builder(cfg, model_args_from_hf(config), ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
        ours = build_stage(config, role, torch.float32)
        marks = [{n: tuple(getattr(p, k, None) for k in keys) for n, p in m.named_parameters()} for m in (reference, ours)]
        assert any(v[0] for v in marks[0].values())  # the reference build has TP-split weights at all
        same.append(marks[0] == marks[1])
    return same


def test_uninitialised_build_marks_tp_shards_like_megatron(tmp_path) -> None:
    """The converters skip megatron-core's CPU weight initialisation (every parameter is
    overwritten); the TP attributes sharding and checkpoints rely on must still be exactly
    megatron-core's (QKV bias, gated fc1 with stride 2, row-parallel, vocab-parallel)."""
    hf_dir = make_hf_dir(str(tmp_path / "hf"), "qwen2", False)
    assert run_distributed(_tp_attributes, 2, tp=2, args=(hf_dir,)) == [[True, True], [True, True]]


def _model_free_against_loaded_model(meg_dir: str, max_bytes: int | None) -> list[str]:
    """This rank's HF tensors read without a model equal, name for name and bit for bit, those of
    the stage built and loaded by megatron-core, TP-gathered and mapped (the writer ranks; the
    others read nothing). Returns the names read here."""
    from megatron.core import parallel_state as ps

    from megatron_gad.convert import load_stage, read_hf_config, read_stage_hf_tensors
    from megatron_gad.models.hf_mapping import megatron_to_hf_tensors
    from megatron_gad.models.sharding import full_tensors

    config = read_hf_config(meg_dir)
    got = dict(read_stage_hf_tensors(meg_dir, config, "actor", torch.float32, max_bytes))
    ref = {hf: t for name, full in full_tensors(load_stage(meg_dir, config, "actor", torch.float32))
           for hf, t in megatron_to_hf_tensors(name, full, config, "actor")}
    if ps.get_tensor_model_parallel_rank() != 0:
        assert got == {}
        return []
    assert set(got) == set(ref), set(got) ^ set(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    return sorted(got)


def test_model_free_read_matches_the_loaded_model(tmp_path) -> None:
    """megatron_to_hf reads the checkpoint without building a model: at TP=1 (one load) and at
    TP=2 x PP=2 in loads of at most 30 KB (tensors split across loads), each stage's writer gets
    exactly the tensors of megatron-core's own load of that stage, and the stages together hold
    every HF tensor once (untied Qwen2: QKV biases, a padded vocabulary, an lm_head)."""
    from transformers import AutoConfig

    from megatron_gad.models.hf_mapping import hf_expected_shapes

    hf_dir = make_hf_dir(str(tmp_path / "hf"), "qwen2", False, layers=4)
    meg = str(tmp_path / "meg")
    run_distributed(_convert, 1, args=(hf_dir, meg, "actor"))
    expected = set(hf_expected_shapes(AutoConfig.from_pretrained(hf_dir)))
    assert set(run_distributed(_model_free_against_loaded_model, 1, args=(meg, None))[0]) == expected
    per_rank = run_distributed(_model_free_against_loaded_model, 4, tp=2, pp=2, args=(meg, 30_000))
    read = [n for names in per_rank for n in names]
    assert sorted(read) == sorted(expected) and all(per_rank[r] for r in (0, 2))
