"""The GPU readiness check: run by ``scripts/gpu_check.sh`` (see there for preparing the wheels).

Four sections, one table, the same code on the CPU with tiny shapes under ``--dry-run``:

1. ``tests``: ``pytest -m gpu`` over tests/ (which ran, which were skipped and why);
2. ``train``: one bf16 actor training step (Megatron DDP, fp32 master weights and main grads,
   Adam) of a ~0.5B-parameter Llama-shaped model from random initialisation, at 3 sequence
   lengths with the same tokens per step: tokens/s and model FLOPs utilisation (MFU) against
   the chip's bf16 dense peak;
3. ``demo``: the embedded GAD demo on this device with the built-in engine
   (``actor_rollout_ref.rollout.name=cpu``; the engine runs on the trainer's device): mean step
   time by phase over the GAD steps after the first;
4. ``export``: the weight export from the Megatron layout into the built-in engine, timed
   against one device-to-device copy of the same number of bytes.

MFU convention (PaLM, Chowdhery et al. 2022, appendix B): training FLOPs per token
``6 N + 12 L H Q T`` with N the matmul parameters (every linear layer and the output layer, not
the input embedding), L layers, H heads, Q head dimension, T the sequence length; the causal
mask is not discounted. Peak: NVIDIA H200 SXM, 989 TFLOPS bf16 dense (the datasheet's
1,979 TFLOPS are "with sparsity", twice the dense rate); ``--peak-tflops`` for another chip.

    python scripts/gpu_check.py [--dry-run] [--skip tests,demo] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200_BF16_DENSE_TFLOPS = 989.0
SECTIONS = ("tests", "train", "demo", "export")


# ---------------------------------------------------------------------------------------------- shapes
def llama_config(dry_run: bool) -> Any:
    """The benchmark model: ~0.5B parameters (Llama-shaped: GQA, SwiGLU, RMSNorm, untied 32k
    vocabulary), or a tiny one for the dry run."""
    from transformers import LlamaConfig

    if dry_run:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
    else:
        shape = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, vocab_size=32000)
    return LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       initializer_range=0.02, pad_token_id=0, eos_token_id=2, bos_token_id=1, **shape)


def matmul_params(hf: Any) -> int:
    """Parameters that take part in a matmul per token: every linear layer and the output layer."""
    h, f, layers = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers
    d = h // hf.num_attention_heads
    attn = h * d * (hf.num_attention_heads * 2 + hf.num_key_value_heads * 2)  # q, o; k, v
    return layers * (attn + 3 * h * f) + hf.vocab_size * h


def train_flops_per_token(hf: Any, seq: int) -> float:
    """``6 N + 12 L H Q T`` (see the module docstring)."""
    d = hf.hidden_size // hf.num_attention_heads
    return 6.0 * matmul_params(hf) + 12.0 * hf.num_hidden_layers * hf.num_attention_heads * d * seq


# ---------------------------------------------------------------------------------------------- sections
def run_gpu_tests(dry_run: bool, timeout_s: int) -> dict:
    """``pytest -m gpu`` over tests/ (the dry run: tests/rollout only); counts and skip reasons."""
    target = os.path.join(REPO, "tests", "rollout") if dry_run else os.path.join(REPO, "tests")
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", target], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s)
        seconds = time.perf_counter() - start
        result = {"rc": proc.returncode, "seconds": seconds, "passed": [], "failed": [], "skipped": []}
        if not os.path.exists(xml):
            result["error"] = (proc.stdout + proc.stderr)[-2000:]
            return result
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name', '')}"
            skipped = case.find("skipped")
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            if skipped is not None:
                result["skipped"].append({"test": name, "reason": skipped.get("message", "")})
            elif failed is not None:
                result["failed"].append({"test": name, "message": (failed.get("message") or "")[:300]})
            else:
                result["passed"].append(name)
    # rc 5: no test selected, not an error of the check
    result["ok"] = proc.returncode in (0, 5) and not result["failed"]
    return result


def build_actor(hf: Any, micro: int) -> Any:
    from megatron_gad.engine.actor import ActorEngine
    from megatron_gad.engine.config import ActorConfig
    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.build import OptimConfig

    cfg = transformer_config_from_hf(hf, tp=1, pp=1)  # bf16 on CUDA, fp32 on the CPU
    return ActorEngine.create(cfg, model_args_from_hf(hf), ActorConfig(ppo_micro_batch_size_per_gpu=micro),
                              OptimConfig(lr=1e-5, clip_grad=1.0))


def sft_batch(rows: int, seq: int, vocab: int, seed: int) -> Any:
    import torch

    from megatron_gad.engine.batch import SftBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    loss = torch.zeros_like(ids)
    loss[:, seq // 4:] = 1  # a prompt quarter, then the response
    pos = torch.arange(seq).expand(rows, seq).contiguous()
    return SftBatch(ids, mask, pos, loss)


def run_train(hf: Any, seqs: list[int], tokens_per_step: int, micro_tokens: int, steps: int,
              peak_tflops: float | None) -> tuple[list[dict], Any]:
    """Per sequence length: one warm-up step, then ``steps`` timed steps (median reported)."""
    import torch

    from megatron_gad.runtime.distributed import device

    micro_rows = {s: max(1, micro_tokens // s) for s in seqs}
    engine = build_actor(hf, micro_rows[seqs[0]])
    params = sum(p.numel() for p in engine.chunks[0].parameters())
    dtype = str(next(engine.chunks[0].parameters()).dtype).replace("torch.", "")
    rows_out = []
    for seq in seqs:
        rows = max(micro_rows[seq], tokens_per_step // seq)
        batch = sft_batch(rows, seq, hf.vocab_size, seed=seq)
        times, loss = [], float("nan")
        for i in range(steps + 1):
            _sync()
            start = time.perf_counter()
            metrics = engine.sft_update(batch, micro_batch_size=micro_rows[seq])
            _sync()
            if i:
                times.append(time.perf_counter() - start)
            loss = metrics["actor/sft_loss"]
        step_s = statistics.median(times)
        tokens = rows * seq
        flops = train_flops_per_token(hf, seq) * tokens
        row = {"seq": seq, "rows": rows, "micro_rows": micro_rows[seq], "tokens": tokens, "step_s": step_s,
               "tokens_per_s": tokens / step_s, "tflops": flops / step_s / 1e12, "loss": loss,
               "params": params, "dtype": dtype, "device": str(device())}
        row["mfu"] = row["tflops"] / peak_tflops if peak_tflops else None
        if torch.cuda.is_available():
            row["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows_out.append(row)
    return rows_out, engine


def run_export(engine: Any, hf: Any, repeats: int) -> dict:
    """Export alone, export + load into the built-in engine on this device, and a plain
    device-to-device copy of the exported byte count (best of ``repeats`` each)."""
    import torch

    from megatron_gad.rollout.base import RolloutConfig, TokenSpec
    from megatron_gad.rollout.cpu_engine import CPURolloutEngine
    from megatron_gad.rollout.weight_export import WeightExporter, sync_weights
    from megatron_gad.runtime.distributed import device

    dev = device()
    exporter = WeightExporter(engine.chunks, hf, dtype=torch.bfloat16, dst_ranks=(0,))
    exporter.metadata()
    target = CPURolloutEngine(RolloutConfig(name="cpu"), hf, TokenSpec(0, (2,)), device=str(dev))
    export_s, sync_s = [], []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        stats = sync_weights(exporter, None)
        _sync()
        export_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        stats = sync_weights(exporter, target)
        _sync()
        sync_s.append(time.perf_counter() - start)
    nbytes = stats.exported_bytes
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_s = []
    for _ in range(repeats + 1):
        _sync()
        start = time.perf_counter()
        dst.copy_(src)
        _sync()
        copy_s.append(time.perf_counter() - start)
    del src, dst
    out = {"bytes": nbytes, "tensors": stats.num_tensors, "buckets": stats.num_buckets,
           "export_s": min(export_s), "export_load_s": min(sync_s), "copy_s": min(copy_s[1:])}
    for key in ("export", "export_load", "copy"):
        out[f"{key}_gbps"] = nbytes / out[f"{key}_s"] / 1e9
    out["export_load_over_copy"] = out["export_load_s"] / out["copy_s"]
    return out


def run_demo(steps: int, timeout_s: int, extra: list[str]) -> dict:
    """The embedded GAD demo (1 SFT step, 1 critic step, then GAD) with the built-in engine on this
    device; mean seconds by phase over the GAD steps after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        overrides = [f"trainer.total_training_steps={steps}", "trainer.generator_warmup_steps=1",
                     "trainer.critic_warmup=1", "trainer.test_freq=-1", "trainer.val_before_train=false",
                     "trainer.resume_mode=disable", f"trainer.default_local_dir={out}", "trainer.logger=[jsonl]",
                     "actor_rollout_ref.rollout.name=cpu", *extra]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "pretrain_gad.py"), *overrides],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - start
        metrics_path = os.path.join(out, "metrics.jsonl")
        rows = []
        if os.path.exists(metrics_path):
            with open(metrics_path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
    result: dict[str, Any] = {"rc": proc.returncode, "wall_s": wall, "steps": len(rows)}
    if proc.returncode != 0:
        result["error"] = (proc.stdout + proc.stderr)[-2000:]
        return result
    gad = [r for r in rows if "actor/pg_loss" in r]
    timed = gad[1:] if len(gad) > 1 else gad
    result["gad_steps_timed"] = len(timed)
    phases = sorted({k for r in timed for k in r if k.startswith("timing/")})
    phases = [k for k in phases if k != "timing/step"] + ["timing/step"]
    result["phases"] = {k[len("timing/"):]: statistics.mean(r.get(k, 0.0) for r in timed) for k in phases}
    return result


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- report
def environment() -> dict:
    import importlib.metadata as md
    import importlib.util

    import torch

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "megatron-core": version("megatron-core"), "megatron_gad": version("megatron_gad"),
           "transformers": version("transformers"), "vllm": version("vllm"),
           "transformer-engine": version("transformer-engine") or version("transformer_engine"),
           "megatron_gad_path": os.path.dirname(importlib.util.find_spec("megatron_gad").origin)}
    return env


def table(report: dict) -> str:
    """The one table: section | item | value."""
    lines: list[tuple[str, str, str]] = []
    env = report["env"]
    lines.append(("env", "device", f"{env['device']} (torch {env['torch']}, cuda {env['cuda']})"))
    lines.append(("env", "packages", f"megatron-core {env['megatron-core']}, transformers {env['transformers']}, "
                  f"vllm {env['vllm']}, TE {env['transformer-engine']}"))
    t = report.get("tests")
    if t:  # None when the section raised (see "errors")
        lines.append(("tests", "pytest -m gpu", f"{len(t['passed'])} passed, {len(t['failed'])} failed, "
                      f"{len(t['skipped'])} skipped ({t['seconds']:.0f} s, rc {t['rc']})"))
        for s in t["skipped"]:
            lines.append(("tests", f"skip {s['test']}", s["reason"][:90]))
        for s in t["failed"]:
            lines.append(("tests", f"FAIL {s['test']}", s["message"][:90]))
        if "error" in t:
            lines.append(("tests", "ERROR", t["error"].strip().splitlines()[-1][:120]))
    for r in report.get("train", []):
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a (no peak on the CPU)"
        lines.append(("train", f"seq {r['seq']} x {r['rows']} rows (micro {r['micro_rows']})",
                      f"{r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tok/s, {r['tflops']:.1f} TFLOP/s, "
                      f"MFU {mfu}, loss {r['loss']:.3f}, {r['params'] / 1e6:.0f}M params {r['dtype']}"
                      + (f", peak {r['max_mem_gib']:.1f} GiB" if "max_mem_gib" in r else "")))
    d = report.get("demo")
    if d:
        if d["rc"] != 0:
            last = d.get("error", "").strip().splitlines()[-1:] or [""]
            lines.append(("demo", "FAILED", last[0][:120]))
        else:
            lines.append(("demo", "run", f"{d['steps']} steps in {d['wall_s']:.1f} s wall (incl. start-up); "
                          f"phases: mean of {d['gad_steps_timed']} GAD step(s)"))
            for name, sec in d["phases"].items():
                lines.append(("demo", "step (sum of phases)" if name == "step" else name, f"{sec:.3f} s"))
    e = report.get("export")
    if e:
        lines.append(("export", "bytes",
                      f"{e['bytes'] / 1e6:.1f} MB bf16, {e['tensors']} tensors, {e['buckets']} bucket(s)"))
        lines.append(("export", "export only", f"{e['export_s']:.4f} s ({e['export_gbps']:.1f} GB/s)"))
        lines.append(("export", "export + engine load",
                      f"{e['export_load_s']:.4f} s ({e['export_load_gbps']:.1f} GB/s)"))
        lines.append(("export", "device copy, same bytes", f"{e['copy_s']:.5f} s ({e['copy_gbps']:.1f} GB/s)"))
        lines.append(("export", "export+load / copy", f"{e['export_load_over_copy']:.1f}x"))
    for section, message in report.get("errors", {}).items():
        lines.append((section, "ERROR", message))
    w0 = max(len(a) for a, _, _ in lines)
    w1 = max(len(b) for _, b, _ in lines)
    out = [f"{'section':<{w0}}  {'item':<{w1}}  value", "-" * (w0 + w1 + 60)]
    out += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny shapes (what CI runs)")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to leave out of {SECTIONS}")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"bf16 dense peak of the chip (default {H200_BF16_DENSE_TFLOPS:g}, NVIDIA H200 SXM)")
    parser.add_argument("--seqs", default=None, help="sequence lengths of the training step (default 512,1024,2048)")
    parser.add_argument("--demo-steps", type=int, default=None, help="demo steps (default 8; dry run 3)")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        parser.error(f"--skip names unknown sections {sorted(skip - set(SECTIONS))}; choose from {SECTIONS}")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: CUDA is not available; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    if args.dry_run and torch.cuda.is_available():
        print("note: --dry-run on a machine with CUDA still uses the CUDA device for the model sections",
              file=sys.stderr)
    dry = args.dry_run
    try:
        seqs = [int(s) for s in (args.seqs or ("16,32" if dry else "512,1024,2048")).split(",")]
    except ValueError:
        seqs = []
    if not seqs or min(seqs) < 2 or max(seqs) > 4096:
        parser.error(f"--seqs must be comma-separated sequence lengths in [2, 4096], got {args.seqs!r}")
    demo_steps = args.demo_steps or (3 if dry else 8)
    peak = None if dry and not torch.cuda.is_available() else (args.peak_tflops or H200_BF16_DENSE_TFLOPS)
    report: dict[str, Any] = {"dry_run": dry, "peak_tflops": peak, "env": environment(), "seconds": {}}
    started = time.perf_counter()

    errors: dict[str, str] = {}

    def timed(name: str, fn: Any) -> Any:
        """Run one section; a failure is recorded (the table and the JSON still come out) and
        makes the exit status 1."""
        start = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others
            import traceback

            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            return None
        finally:
            report["seconds"][name] = time.perf_counter() - start

    if "tests" not in skip:
        report["tests"] = timed("tests", lambda: run_gpu_tests(dry, timeout_s=240))
    if "demo" not in skip:
        # the dry run trains on 4 prompts a step (the demo's 16 cost a minute of CPU there)
        small = (["data.train_batch_size=4", "actor_rollout_ref.ppo_mini_batch_size=4", "critic.ppo_mini_batch_size=4"]
                 if dry else [])
        report["demo"] = timed("demo", lambda: run_demo(demo_steps, timeout_s=300, extra=small))
    if not {"train", "export"} <= skip:
        from megatron_gad.runtime.distributed import destroy_distributed, init_distributed

        init_distributed(tp=1, pp=1, seed=1)
        hf = llama_config(dry)
        tokens = 256 if dry else 32768
        micro_tokens = 64 if dry else 8192
        steps = 1 if dry else 3
        trained = timed("train", lambda: run_train(hf, seqs, tokens, micro_tokens, steps, peak))
        if trained is not None:
            train_rows, engine = trained
            if "train" not in skip:
                report["train"] = train_rows
            if "export" not in skip:
                report["export"] = timed("export", lambda: run_export(engine, hf, repeats=2 if dry else 3))
            del engine
        destroy_distributed()
    report["errors"] = errors
    report["seconds"]["total"] = time.perf_counter() - started
    text = table(report)
    print(text)
    print(f"total {report['seconds']['total']:.0f} s; sections: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items() if k != "total"))
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu_check.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(out_dir, "gpu_check.txt"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
    failed = bool(errors) or (report.get("tests") and not report["tests"].get("ok")) or (
        report.get("demo") and report["demo"]["rc"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
