"""The streaming exporter gives the same HF tensors at every TP x PP layout, bounded by its bucket.

A one-process run saves a Megatron checkpoint and computes the expected HF tensors directly with
``megatron_to_hf_tensors`` over ``full_tensors``; each parallel layout loads that checkpoint and
streams its export to the destination ranks, which must receive exactly those tensors (bit for
bit, in bfloat16), and nothing else.
"""

from __future__ import annotations

import pytest
import torch

from megatron_gad.runtime.spawn import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

VOCAB = 200


def tiny_hf_config(arch: str = "qwen2", tied: bool = False, layers: int = 4):
    """A small GQA model (QKV bias for qwen2, QK norm for qwen3)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    return cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied, rms_norm_eps=1e-6, **extra,
    )


def _build(hf_config):
    from megatron.core import parallel_state as ps

    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.build import build_model

    cfg = transformer_config_from_hf(
        hf_config, tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size()
    )
    args = model_args_from_hf(hf_config)
    return build_model(lambda pre, post: build_actor(cfg, args, pre, post), cfg)


def export_rank(hf_config, ckpt: str, save: bool, dst_ranks: tuple, bucket_bytes: int, dtype,
                transport: str = "auto") -> dict:
    """Per rank: build, save or load the checkpoint, export; return what this rank received."""
    import torch.distributed as dist

    from megatron_gad.checkpoint import load_model, save_model
    from megatron_gad.models.hf_mapping import megatron_to_hf_tensors
    from megatron_gad.models.sharding import full_tensors
    from megatron_gad.rollout.weight_export import WeightExporter

    chunks = _build(hf_config)
    (save_model if save else load_model)(chunks, ckpt)
    exporter = WeightExporter(chunks, hf_config, dtype=dtype, bucket_bytes=bucket_bytes, dst_ranks=dst_ranks,
                              transport=transport)
    got: dict[str, torch.Tensor] = {}
    buckets = []
    for bucket in exporter.buckets():
        buckets.append([name for name, _ in bucket])
        for name, tensor in bucket:
            assert name not in got, f"{name} exported twice"
            got[name] = tensor.clone()
    expected = None
    if save:  # the reference: convert every full tensor directly
        expected = {}
        for name, full in full_tensors(chunks[0]):
            for hf_name, t in megatron_to_hf_tensors(name, full, hf_config):
                expected[hf_name] = t.to(dtype)
    return {"rank": dist.get_rank(), "got": got, "expected": expected, "stats": exporter.stats, "buckets": buckets}


LAYOUTS = [(2, 1, 2, (0,)), (1, 2, 2, (0,)), (2, 2, 4, (0, 3)), (1, 2, 4, (0,))]  # tp, pp, world, dst_ranks


@pytest.mark.parametrize("arch,tied,transport", [("qwen2", False, "auto"), ("llama", True, "auto"),
                                                 ("qwen2", False, "direct"), ("qwen2", False, "gather")],
                         ids=["qwen2-untied-auto", "llama-tied-auto", "qwen2-untied-direct", "qwen2-untied-gather"])
def test_export_equals_tp1_conversion_at_every_layout(arch: str, tied: bool, transport: str, tmp_path) -> None:
    """Every transport delivers exactly the TP=1 conversion at every layout: ``auto`` on these
    gloo ranks (shards through shared memory with one destination rank, gloo sends with two;
    the 4 KB buckets make the shared-memory links run many rounds), ``direct`` (gloo sends
    straight to the destinations) and ``gather`` (TP all-gather, then a PP send)."""
    from transformers import AutoModelForCausalLM

    hf_config = tiny_hf_config(arch, tied)
    ckpt = str(tmp_path / "ckpt")
    ref = run_distributed(export_rank, 1, args=(hf_config, ckpt, True, (0,), 4096, torch.bfloat16))[0]
    expected = ref["expected"]
    hf_names = {n for n, _ in AutoModelForCausalLM.from_config(hf_config).named_parameters()}
    assert set(expected) == hf_names, "the reference conversion must cover the HF model exactly"
    assert ref["got"].keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(ref["got"][name], t), f"TP1 export differs from megatron_to_hf: {name}"
    # The tied case matters where the output layer copy lives on another stage: PP layouts only.
    for tp, pp, world, dst in (LAYOUTS[1:3] if tied else LAYOUTS):
        results = run_distributed(export_rank, world, tp=tp, pp=pp,
                                  args=(hf_config, ckpt, False, dst, 4096, torch.bfloat16, transport))
        for res in results:
            label = f"tp={tp} pp={pp} world={world} rank={res['rank']}"
            if res["rank"] not in dst:
                assert res["got"] == {} and res["stats"].num_buckets == 0, f"{label}: a non-destination rank received tensors"
                continue
            assert res["got"].keys() == expected.keys(), f"{label}: names differ: {set(res['got']) ^ set(expected)}"
            for name, t in expected.items():
                assert res["got"][name].dtype == torch.bfloat16
                assert torch.equal(res["got"][name], t), f"{label}: {name} differs from the TP1 conversion"
            assert res["buckets"] == ref["buckets"], f"{label}: bucket boundaries depend on the layout"


def peak_rank(hf_config, bucket_bytes: int) -> dict:
    from megatron_gad.rollout.weight_export import WeightExporter

    chunks = _build(hf_config)
    exporter = WeightExporter(chunks, hf_config, dtype=torch.float32, bucket_bytes=bucket_bytes)
    largest = 0
    for bucket in exporter.buckets():
        largest = max(largest, max(t.numel() * t.element_size() for _, t in bucket))
    model_bytes = sum(p.numel() * p.element_size() for p in chunks[0].parameters())
    return {"stats": exporter.stats, "model_bytes": model_bytes}


def test_bucket_size_bounds_peak_memory() -> None:
    """Peak bytes alive follow the bucket size, not the model size."""
    small, big = 64 * 1024, 1 << 40
    # The largest single HF tensor here is the 200x64 fp32 embedding (51 KB) and the fused
    # 192x64 fc1 split in two: any bucket must fit one full tensor plus its conversion.
    runs = {}
    for layers in (2, 8):
        cfg = tiny_hf_config("qwen2", False, layers=layers)
        runs[layers, small] = run_distributed(peak_rank, 1, args=(cfg, small))[0]
        runs[layers, big] = run_distributed(peak_rank, 1, args=(cfg, big))[0]
    one_tensor = 200 * 64 * 4  # embedding / output layer rows of the real vocab
    padded = 256 * 64 * 4  # the padded Megatron output layer in flight
    for layers in (2, 8):
        s_small, s_big = runs[layers, small]["stats"], runs[layers, big]["stats"]
        model_bytes = runs[layers, small]["model_bytes"]
        assert s_small.exported_bytes == s_big.exported_bytes > 0
        assert max(s_small.bucket_sizes) <= small
        assert s_small.peak_bytes <= small + padded + one_tensor, f"{layers} layers: peak {s_small.peak_bytes}"
        assert s_big.num_buckets == 1 and s_big.peak_bytes >= s_big.exported_bytes
        assert s_big.peak_bytes <= model_bytes + padded + one_tensor
    # Four times the layers: the whole-model peak grows, the bucketed peak does not.
    assert runs[8, big]["stats"].peak_bytes > 2.5 * runs[2, big]["stats"].peak_bytes
    assert runs[8, small]["stats"].peak_bytes == runs[2, small]["stats"].peak_bytes


def _export_with_a_nan(hf_config) -> str:
    from megatron_gad.models.sharding import unwrap
    from megatron_gad.rollout.base import ModelDivergedError
    from megatron_gad.rollout.weight_export import WeightExporter

    chunks = _build(hf_config)
    with torch.no_grad():
        unwrap(chunks[0]).decoder.layers[1].mlp.linear_fc2.weight[0, 0] = float("nan")
    try:
        for _ in WeightExporter(chunks, hf_config, dtype=torch.float32, bucket_bytes=1 << 30).buckets():
            pass
    except ModelDivergedError as exc:
        return str(exc)
    return "no error"


def test_non_finite_weights_are_refused() -> None:
    message = run_distributed(_export_with_a_nan, 1, args=(tiny_hf_config(),))[0]
    assert message == ("exported weights hold inf/NaN (first: decoder.layers.1.mlp.linear_fc2.weight): the model "
                       "has diverged (learning rate too high?)"), message


def _peak_rss() -> int:
    """This process's peak resident bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _resident_peak_of_export(bucket_bytes: int) -> dict:
    """Per rank: the growth of this process's peak resident memory (VmHWM) while a consumer holds
    one bucket at a time, against the model's bytes. The peak is reset to the current resident
    size first: a forked rank inherits its parent's peak, which an earlier test in the same
    pytest process may have raised above what this export reaches."""
    from transformers import LlamaConfig

    from megatron_gad.rollout.weight_export import WeightExporter

    # many mid-size tensors (the largest 4 MB): the whole model, not one tensor's transients,
    # is what a whole-model bucket holds
    hf_config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                            num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    chunks = _build(hf_config)
    model_bytes = sum(p.numel() * p.element_size() for p in chunks[0].parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size to the current one
    before = _peak_rss()
    # bf16: every exported tensor is a new allocation (an fp32 export at TP=1 may yield views of
    # the live parameters, which cost nothing)
    for bucket in WeightExporter(chunks, hf_config, dtype=torch.bfloat16, bucket_bytes=bucket_bytes).buckets():
        del bucket
    grown = _peak_rss() - before
    print(f"bucket {bucket_bytes}: peak RSS grew {grown / 2**20:.1f} MiB exporting {model_bytes // 2 / 2**20:.1f} MiB")
    return {"grown": grown, "export_bytes": model_bytes // 2}


def test_bucket_size_bounds_resident_memory() -> None:
    """Measured, not bookkept: exporting a ~170 MB (fp32) model as bf16 in 2 MB buckets grows the
    process's peak resident memory by a small fraction of what one whole-model bucket does."""
    small = run_distributed(_resident_peak_of_export, 1, args=(2 << 20,))[0]
    whole = run_distributed(_resident_peak_of_export, 1, args=(1 << 40,))[0]
    exported = whole["export_bytes"]
    assert whole["grown"] > 0.6 * exported, whole
    assert small["grown"] < 0.25 * exported, (small, exported)


def _one_step(chunks, optimizer, seq: int = 6) -> None:
    """One real fwd/bwd/optimizer step over Megatron's schedule on a squared-logit loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gad.models.inputs import attention_mask_4d, position_ids_from_mask

    ids = torch.randint(4, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))

    def forward_step(data_iterator, model):
        m_ids = next(data_iterator)
        mask = torch.ones_like(m_ids)
        out = model(input_ids=m_ids, position_ids=position_ids_from_mask(mask), attention_mask=attention_mask_4d(mask))
        return out, lambda o: (o.float().square().mean(), {})

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids]), model=chunks,
                                num_microbatches=1, seq_length=seq, micro_batch_size=2, forward_only=False)
    optimizer.step()


def inplace_sync_rank(hf_config, transport: str) -> dict:
    """Per rank: sync into a CPU engine on rank 0 (the first load, then in place), take an
    optimizer step, sync again, then a sync that finds a NaN on the last stage, then a repaired
    one. Rank 0 compares the engine's weights with a ``gather`` export of the same model each time."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_gad.models import transformer_config_from_hf
    from megatron_gad.models.build import OptimConfig, build_optimizer
    from megatron_gad.models.sharding import unwrap
    from megatron_gad.rollout.base import ModelDivergedError, RolloutConfig, TokenSpec
    from megatron_gad.rollout.cpu_engine import CPURolloutEngine
    from megatron_gad.rollout.weight_export import WeightExporter, sync_weights

    chunks = _build(hf_config)
    cfg = transformer_config_from_hf(hf_config, tp=ps.get_tensor_model_parallel_world_size(),
                                     pp=ps.get_pipeline_model_parallel_world_size())
    optimizer = build_optimizer(chunks, OptimConfig(lr=1e-2, clip_grad=1.0), cfg)
    exporter = WeightExporter(chunks, hf_config, dtype=torch.float32, bucket_bytes=4096,
                              transport="auto" if transport == "slots" else transport)
    if transport == "slots":  # as where /dev/shm has no room for the arena: the links' slots carry the blocks
        exporter._arena = {}
    reference = WeightExporter(chunks, hf_config, dtype=torch.float32, bucket_bytes=1 << 30, transport="gather")
    rank0 = dist.get_rank() == 0
    engine = CPURolloutEngine(RolloutConfig(response_length=2), hf_config, TokenSpec(0, (3,))) if rank0 else None

    def check(label: str) -> dict:
        expected = {n: t.clone() for bucket in reference.buckets() for n, t in bucket}
        if engine is None:
            return {}
        params = dict(engine.model.named_parameters())
        wrong = sorted(n for n, t in expected.items() if not torch.equal(params[n], t))
        megatron = {p.untyped_storage().data_ptr() for p in chunks[0].parameters()}
        return {"wrong": wrong, "loaded": engine.loaded, "names": sorted(expected),
                "probe": {n: params[n].detach().clone()
                          for n in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight")},
                "storage": {n: p.data_ptr() for n, p in params.items()},
                "views": {n for n, p in params.items() if p.untyped_storage().data_ptr() in megatron}}

    out = {}
    sync_weights(exporter, engine)
    out["first"] = check("first")
    sync_weights(exporter, engine)  # nothing changed: the same weights, written in place
    out["again"] = check("again")
    _one_step(chunks, optimizer)
    sync_weights(exporter, engine)
    out["stepped"] = check("stepped")
    fc2 = unwrap(chunks[0]).decoder.layers[-1].mlp.linear_fc2.weight
    last = ps.is_pipeline_last_stage()
    kept = fc2[0, 0].item()
    if last:
        with torch.no_grad():
            fc2[0, 0] = float("nan")
    try:
        sync_weights(exporter, engine)
        out["failed"] = "no error"
    except ModelDivergedError as exc:
        out["failed"] = str(exc)
    if engine is not None:
        out["loaded_after_failure"] = engine.loaded
        try:
            engine.generate(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long))
            out["generate_after_failure"] = "generated"
        except RuntimeError as exc:
            out["generate_after_failure"] = str(exc)
    if last:
        with torch.no_grad():
            fc2[0, 0] = kept
    sync_weights(exporter, engine)
    out["repaired"] = check("repaired")
    out["arena"] = bool(exporter._arena)
    if engine is not None:
        out["generated"] = engine.generate(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)).responses.shape
    return out


@pytest.mark.parametrize("tp,pp,transport", [(1, 1, "auto"), (2, 1, "auto"), (1, 2, "auto"), (2, 2, "auto"),
                                             (2, 2, "direct"), (2, 2, "slots")],
                         ids=["tp1", "tp2", "pp2", "tp2xpp2", "tp2xpp2-direct", "tp2xpp2-slots"])
def test_sync_writes_in_place_into_the_engine_and_a_failed_sync_is_refused(tp: int, pp: int, transport: str) -> None:
    """The CPU engine's own parameters are the destinations: every sync after the first writes
    each assembled tensor (remote shards, the q/k/v split, gate/up) into the same storage and
    gives exactly the weights after an optimizer step. Under ``auto`` on these CPU ranks the
    first sync puts those weights into the exporter's shared-memory arena, where senders then
    write their blocks directly; under ``direct`` (gloo messages), through the shared-memory
    slots (no arena) and at TP=1 blocks land in the engine's own tensors. A sync that meets a NaN (held on the last stage, away from the
    engine's rank) raises on every rank and leaves the engine refusing to generate until a sync
    completes."""
    res = run_distributed(inplace_sync_rank, tp * pp, tp=tp, pp=pp,
                          args=(tiny_hf_config("qwen2", False, layers=2), transport))
    r0 = res[0]
    for phase in ("first", "again", "stepped", "repaired"):
        assert r0[phase]["wrong"] == [] and r0[phase]["loaded"], f"{phase}: {r0[phase]['wrong'][:5]}"
    first, stepped = r0["first"], r0["stepped"]
    assembled = [n for n in first["names"] if n not in first["views"]]
    assert any(n.endswith("q_proj.weight") for n in assembled) and any(n.endswith("v_proj.bias") for n in assembled)
    if tp * pp > 1:  # every tensor with a remote or TP-sharded part is assembled, none is a view
        assert any(n.endswith("down_proj.weight") for n in assembled) and "lm_head.weight" in assembled
    arena = transport == "auto" and tp * pp > 1
    assert [r["arena"] for r in res] == [arena] * len(res), "the arena is used on CPU ranks under auto, on every rank"
    for phase in ("again", "stepped", "repaired"):
        moved = [n for n in assembled if r0[phase]["storage"][n] != first["storage"][n]]
        assert moved == [], f"{phase}: a new tensor instead of an in-place write: {moved[:5]}"
    # the step changed what the engine holds (so "again" and "stepped" are not the same check)
    for name, before in first["probe"].items():
        assert torch.equal(r0["again"]["probe"][name], before) and not torch.equal(stepped["probe"][name], before), name
    for res_rank in res:
        assert res_rank["failed"] == ("exported weights hold inf/NaN (first: decoder.layers.1.mlp.linear_fc2.weight): "
                                      "the model has diverged (learning rate too high?)"), res_rank["failed"]
    assert r0["loaded_after_failure"] is False
    assert "load_weights must run before generate" in r0["generate_after_failure"], r0["generate_after_failure"]
    assert tuple(r0["generated"])[0] == 1


def _sliding_window_warnings_of_two_syncs() -> int:
    """Per rank: how many times two syncs of a Mistral model (sliding window shorter than its
    context) log the transformer module's sliding-window warning."""
    import logging

    from transformers import MistralConfig

    from megatron_gad.rollout.base import RolloutConfig, TokenSpec
    from megatron_gad.rollout.cpu_engine import CPURolloutEngine
    from megatron_gad.rollout.weight_export import WeightExporter, sync_weights

    hf_config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              sliding_window=16, tie_word_embeddings=False)
    chunks = _build(hf_config)
    engine = CPURolloutEngine(RolloutConfig(), hf_config, TokenSpec(0, (3,)))
    exporter = WeightExporter(chunks, hf_config, dtype=torch.float32, bucket_bytes=4096)
    seen: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger("megatron_gad.models.transformer")
    handler = Count(level=logging.WARNING)
    log.addHandler(handler)
    try:
        for _ in range(2):
            sync_weights(exporter, engine)
    finally:
        log.removeHandler(handler)
    return sum("sliding_window" in message for message in seen)


def test_a_sync_derives_the_model_args_once() -> None:
    """The exporter reads the model's arguments from its HF config once, not once per tensor per
    sync: a Mistral config's sliding-window warning appears once over two syncs."""
    assert run_distributed(_sliding_window_warnings_of_two_syncs, 1)[0] == 1
