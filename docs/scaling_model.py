"""The cost model of docs/scaling.md: prints its tables (every input is a named constant below,
each with its source or marked as an assumption).

    python docs/scaling_model.py
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- hardware (8x H100 SXM node)
HBM_BPS = 3.35e12  # H100 SXM HBM3, NVIDIA H100 datasheet
BF16_FLOPS = 989e12  # H100 SXM bf16 dense (1,979 "with sparsity"), NVIDIA H100 datasheet
NVLINK_BPS = 450e9  # NVLink 4: 900 GB/s per GPU, both directions together; H100 datasheet
IB_BPS_PER_GPU = 50e9  # DGX H100: 8x ConnectX-7 400 Gb/s, one per GPU; DGX H100 user guide
GPUS_PER_NODE = 8
HBM_GB = 80

# ---------------------------------------------------------------- efficiencies (ASSUMPTIONS)
DECODE_BW_EFF = 0.6  # share of HBM bandwidth a decode step reaches (assumption; gpu_check to measure)
TRAIN_MFU = 0.40  # training MFU (assumption; scripts/gpu_check.py measures it on one H200)
PREFILL_MFU = 0.5  # prefill MFU (assumption)
# Weight sync through host memory and RPC (today: gather, D2H, safetensors bytes, engine RPC,
# H2D): measured peers, not this project: TRL #5892 0.18 s for Qwen3-0.6B (1.2 GB bf16, ~6.7 GB/s);
# slime's colocated CUDA-IPC sync of Qwen3-30B-A3B (61 GB bf16) in 7 s (~8.7 GB/s) after
# optimisation (hebiao064.github.io/rl-weight-sync). 8 GB/s is used for today's path.
RPC_SYNC_BPS = 8e9
LOCAL_COPY_EFF = 0.5  # a device-local copy reads and writes: half the HBM bandwidth (assumption)


@dataclass(frozen=True)
class Model:
    name: str
    params: float  # N
    layers: int
    kv_bytes_per_token: float  # K and V, all layers, bf16


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


# A 7B with 32 layers and GQA, 8 KV heads x 128 (K and V: 2 x 32 x 1024 x 2 B per token), and
# Llama-2-70B's shape (80 layers, 8 KV heads x 128: 2 x 80 x 1024 x 2 B); parameter counts rounded.
M7 = Model("7B", 7e9, 32, 2 * 32 * 1024 * 2)
M70 = Model("70B", 70e9, 80, 2 * 80 * 1024 * 2)

# Workload per data-parallel replica and step (stated, not measured): 64 prompts x n=8 = 512
# sequences, 512 prompt + 1024 response tokens each (every response runs to the limit).
SEQS, PROMPT, RESPONSE = 512, 512, 1024
# Training FLOPs per token of a GAD step: actor update 6N, old log-probs 2N, discriminator
# (same size) update on the student and the teacher sequence 2 x 6N.
TRAIN_FLOPS_PER_TOKEN_N = 6 + 2 + 12


def generation_seconds(m: Model, engines: int, tp: int) -> float:
    """All SEQS sequences over ``engines`` engines of ``tp`` GPUs: prefill at PREFILL_MFU, then
    RESPONSE decode steps, each reading the weights and the batch's KV cache at DECODE_BW_EFF."""
    seqs = SEQS / engines
    # KV memory: at most this many sequences decode at once (90% of HBM minus the weights); the
    # rest wait for a later wave
    ctx = PROMPT + RESPONSE
    fit = int((0.9 * HBM_GB * 1e9 * tp - 2 * m.params) // (ctx * m.kv_bytes_per_token))
    if fit < 1:
        return float("inf")
    waves = -(-int(seqs) // fit)
    seqs = seqs / waves
    prefill = 2 * m.params * seqs * PROMPT / (tp * BF16_FLOPS * PREFILL_MFU)
    mean_ctx = PROMPT + RESPONSE / 2
    per_step = (2 * m.params + seqs * mean_ctx * m.kv_bytes_per_token) / (tp * HBM_BPS * DECODE_BW_EFF)
    compute = 2 * m.params * seqs / (tp * BF16_FLOPS * PREFILL_MFU)
    return waves * (prefill + RESPONSE * max(per_step, compute))


def training_seconds(m: Model, lay: Layout) -> float:
    tokens = SEQS * (PROMPT + RESPONSE)
    return TRAIN_FLOPS_PER_TOKEN_N * m.params * tokens / (lay.gpus * BF16_FLOPS * TRAIN_MFU)


def grad_allreduce_seconds(m: Model, lay: Layout, nodes: int) -> float:
    """Ring all-reduce of fp32 main grads (actor and discriminator) over DP; inside one node the
    ring runs on NVLink, across nodes on each GPU's IB link."""
    replicas = nodes * GPUS_PER_NODE // lay.gpus
    if replicas <= 1:
        return 0.0
    grad_bytes = 2 * 4 * m.params / lay.gpus
    bw = NVLINK_BPS if nodes == 1 else IB_BPS_PER_GPU
    return 2 * (replicas - 1) / replicas * grad_bytes / bw


def sync_today(m: Model, lay: Layout) -> tuple[float, float]:
    """(bytes, seconds): full bf16 model gathered to the first rank, sent to the engine by RPC."""
    w = 2 * m.params
    gather = w * (lay.gpus - 1) / lay.gpus / (NVLINK_BPS if lay.gpus <= GPUS_PER_NODE else IB_BPS_PER_GPU)
    return w, gather + w / RPC_SYNC_BPS


def sync_plan(m: Model, lay: Layout) -> tuple[float, float]:
    """(bytes per GPU, seconds): each GPU keeps its own TP shard of its stage (a local copy into
    vLLM's buffers, or none when handed by reference) and receives the other stages' shards of
    its TP rank (the reshard plan with rollout TP = Megatron TP)."""
    shard = 2 * m.params / lay.gpus
    received = shard * (lay.pp - 1)
    link = NVLINK_BPS if lay.gpus <= GPUS_PER_NODE else IB_BPS_PER_GPU
    return shard + received, shard / (HBM_BPS * LOCAL_COPY_EFF) + received / link


def main() -> None:
    cases = [(M7, Layout(2, 1)), (M7, Layout(4, 2)), (M70, Layout(8, 4))]
    print(f"workload per replica and step: {SEQS} sequences, {PROMPT} prompt + {RESPONSE} response tokens; "
          f"GAD training {TRAIN_FLOPS_PER_TOKEN_N}N FLOPs/token")
    print()
    print("| model | Megatron layout | GPUs/replica | weights (bf16) | today: bytes, s | plan: bytes/GPU, s |")
    print("|---|---|---|---|---|---|")
    for m, lay in cases:
        tb, ts = sync_today(m, lay)
        pb, ps_ = sync_plan(m, lay)
        print(f"| {m.name} | TP{lay.tp} x PP{lay.pp} | {lay.gpus} | {2 * m.params / 1e9:.0f} GB | "
              f"{tb / 1e9:.0f} GB, {ts:.1f} s | {pb / 1e9:.1f} GB, {ps_:.3f} s |")
    print()
    print("| model | layout | engines x TP (today -> plan) | generation s | GPU share idle in generation | "
          "training s | step s at 1 / 8 / 64 nodes (today) | (plan) |")
    print("|---|---|---|---|---|---|---|---|")
    for m, lay in cases:
        gen_today = generation_seconds(m, 1, 1 if 2 * m.params < 0.5 * HBM_GB * 1e9 else lay.tp)
        tp_today = 1 if 2 * m.params < 0.5 * HBM_GB * 1e9 else lay.tp
        gen_plan = generation_seconds(m, lay.pp, lay.tp)
        train = training_seconds(m, lay)
        idle_today = 1 - tp_today / lay.gpus
        steps_today, steps_plan = [], []
        for nodes in (1, 8, 64):
            if nodes * GPUS_PER_NODE < lay.gpus:
                steps_today.append("-")
                steps_plan.append("-")
                continue
            ar = grad_allreduce_seconds(m, lay, nodes)
            steps_today.append(f"{gen_today + train + ar + sync_today(m, lay)[1]:.0f}")
            steps_plan.append(f"{gen_plan + train + ar + sync_plan(m, lay)[1]:.0f}")
        print(f"| {m.name} | TP{lay.tp} x PP{lay.pp} | 1 x TP{tp_today} -> {lay.pp} x TP{lay.tp} | "
              f"{gen_today:.0f} -> {gen_plan:.0f} | {idle_today:.0%} -> 0% | {train:.0f} | "
              f"{' / '.join(steps_today)} | {' / '.join(steps_plan)} |")


if __name__ == "__main__":
    main()
