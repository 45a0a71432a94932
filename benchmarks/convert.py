"""Benchmark the HF <-> Megatron converters against the raw safetensors read+write time.

    python benchmarks/convert.py [--hidden 1024 --layers 8 --vocab 32000 --dtype bfloat16]

Writes a random Llama checkpoint (default ~160M parameters, ~320 MB in bf16) as one safetensors
file, then times (median of --repeat runs), in one process (TP=1, PP=1, after imports and
process-group set-up), each repetition running every row once in this order:

- raw: read every tensor of the HF file and write them to a new safetensors file (the practical
  limit of any converter that must read and write those bytes), without and with an fsync;
- hf_to_megatron: :func:`megatron_gad.convert.hf_to_megatron` (read, fuse, save, fsync);
- megatron_to_hf: :func:`megatron_gad.convert.megatron_to_hf` (load, split, write, fsync);

and prints seconds, GB/s (HF bytes / seconds), the ratio to the raw times, CPU seconds (user +
sys, and user alone: raw I/O is nearly all kernel time, which scatters with the disk's other
traffic), and as its last line each converter's ratio to raw + fsync in wall and CPU seconds
(the goal: at most 2). The round trip is checked bit-exact. Run it on an otherwise idle machine
for stable numbers (the file cache is warm for every row: each reads what an earlier step just
wrote). The first repetition also pays one-time start-up costs (imports), as the median hides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable

import torch


def write_random_llama(directory: str, hidden: int, layers: int, vocab: int, dtype: torch.dtype) -> int:
    """A random untied GQA Llama (heads = hidden / 64, kv heads = heads / 2, ffn = 2.75 hidden)
    saved as config.json + model.safetensors; returns the tensor bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from megatron_gad.models.hf_mapping import hf_expected_shapes

    heads = hidden // 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         tie_word_embeddings=False, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(s, generator=g) * 0.02).to(dtype) for n, s in hf_expected_shapes(config).items()}
    os.makedirs(directory)
    config.save_pretrained(directory)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in state.values())


def cpu_seconds() -> tuple[float, float]:
    """(user + system, user) CPU seconds of this process so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_utime


Timing = tuple[float, float, float]  # wall, CPU (user + sys), user seconds


def timed(fn: Callable[[], None]) -> Timing:
    """Wall, CPU and user seconds of ``fn()``."""
    start, (cpu, user) = time.perf_counter(), cpu_seconds()
    fn()
    cpu_end, user_end = cpu_seconds()
    return time.perf_counter() - start, cpu_end - cpu, user_end - user


def raw_read_write(src: str, dst: str, fsync: bool = False) -> None:
    """Read every tensor of ``src`` and write them all to ``dst`` (then fsync it, as every
    converter does with its output, when ``fsync``)."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(src), dst, metadata={"format": "pt"})
    if fsync:
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def timed_conversions(work: str, repeat: int) -> dict[str, list[Timing]]:
    """One rank (TP=1, PP=1): ``repeat`` times, the raw read+write without and with fsync, then
    both directions (inside ``run_distributed``), so every row sees the same machine."""
    from megatron_gad import convert

    times: dict[str, list[Timing]] = {"raw read+write": [], "raw + fsync": [], "hf_to_megatron": [], "megatron_to_hf": []}
    src = os.path.join(work, "hf", "model.safetensors")
    for i in range(repeat):
        meg, back = os.path.join(work, f"megatron{i}"), os.path.join(work, f"hf_back{i}")
        raw, synced = os.path.join(work, f"raw{i}.safetensors"), os.path.join(work, f"sync{i}.safetensors")
        times["raw read+write"].append(timed(lambda: raw_read_write(src, raw)))
        times["raw + fsync"].append(timed(lambda: raw_read_write(src, synced, fsync=True)))
        times["hf_to_megatron"].append(timed(lambda: convert.hf_to_megatron(os.path.join(work, "hf"), meg)))
        times["megatron_to_hf"].append(timed(lambda: convert.megatron_to_hf(meg, back)))
        check_round_trip(os.path.join(work, "hf"), back)
        for path in (raw, synced):
            os.remove(path)
        shutil.rmtree(meg)
        shutil.rmtree(back)
    return times


def check_round_trip(src: str, dst: str) -> None:
    """Raise when the exported tensors differ from the source in any bit."""
    from safetensors.torch import load_file

    a = load_file(os.path.join(src, "model.safetensors"))
    b = load_file(os.path.join(dst, "model.safetensors"))
    if set(a) != set(b) or not all(torch.equal(a[k], b[k]) for k in a):
        raise RuntimeError("round trip is not bit-exact")


def main() -> None:
    """Parse arguments, run, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions; the table shows the median")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a new temp dir)")
    args = p.parse_args()

    import megatron.core.models.gpt  # noqa: F401  (imported before forking the rank)

    from megatron_gad.runtime.spawn import run_distributed

    work = tempfile.mkdtemp(prefix="mgad_bench_", dir=args.workdir)
    try:
        nbytes = write_random_llama(os.path.join(work, "hf"), args.hidden, args.layers, args.vocab, getattr(torch, args.dtype))
        rows = run_distributed(timed_conversions, 1, timeout_s=1800, args=(work, args.repeat))[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = nbytes / 1e9
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}: "
          f"{gb * 1e3:.0f} MB of tensors; {torch.get_num_threads()} torch threads; round trip bit-exact")
    med = {name: statistics.median(w for w, _, _ in v) for name, v in rows.items()}
    cpu = {name: statistics.median(c for _, c, _ in v) for name, v in rows.items()}
    user = {name: statistics.median(u for _, _, u in v) for name, v in rows.items()}
    print(f"median of {args.repeat} interleaved runs (all runs' wall seconds in the last column); "
          "CPU-s = user + sys")
    print(f"{'step':<16}{'seconds':>9}{'GB/s':>8}{'x raw':>8}{'x raw+fsync':>13}{'CPU-s':>8}{'user-s':>8}"
          f"{'CPU x raw+fsync':>17}  runs")
    for name, sec in med.items():
        runs = " ".join(f"{w:.2f}" for w, _, _ in rows[name])
        print(f"{name:<16}{sec:>9.2f}{ratio(gb, sec):>8.2f}{ratio(sec, med['raw read+write']):>8.2f}"
              f"{ratio(sec, med['raw + fsync']):>13.2f}{cpu[name]:>8.2f}{user[name]:>8.2f}"
              f"{ratio(cpu[name], cpu['raw + fsync']):>17.2f}  {runs}")
    converters = ("hf_to_megatron", "megatron_to_hf")
    print(" ".join(f"{name}_over_raw_fsync={ratio(med[name], med['raw + fsync']):.2f}" for name in converters) + " "
          + " ".join(f"{name}_cpu_over_raw_fsync={ratio(cpu[name], cpu['raw + fsync']):.2f}" for name in converters))


def ratio(a: float, b: float) -> float:
    """``a / b``, nan when ``b`` is 0 (a tiny run below the clock's resolution)."""
    return a / b if b > 0 else float("nan")


if __name__ == "__main__":
    main()
