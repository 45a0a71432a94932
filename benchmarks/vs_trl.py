"""Side-by-side benchmark: a pure-GSPO step of megatron_gad against Hugging Face TRL's GRPOTrainer.

Both sides train the demo student (2 layers, hidden 128, 4 heads, tied embeddings, vocab 32,
fp32) on the standard-mode demo data with the same work per optimizer step: 16 prompts x n=8
responses of at most 24 tokens at temperature 1, the demo's exact-match rule reward, GRPO
advantages with std normalisation, GSPO (sequence-level ratio) with clip 3e-4 / 4e-4, no KL,
one optimizer step per 128 sequences (lr 1e-6, grad clip 1.0), a checkpoint at the end, one
thread per side (``OMP_NUM_THREADS=1``).

TRL is installed on first use into its own virtual environment, ``.bench-venvs/trl`` at the
repository root (gitignored): ``torch==2.13.0`` first, then ``trl==1.16.0``. The sides run
alternately (ours, TRL, TRL without gradient checkpointing, ours, ...) and every figure is a
median over the runs; CPU seconds are user + sys (the measure that survives a loaded machine).

    python benchmarks/vs_trl.py [--steps 6] [--runs 3] [--warmup 2]

Prints a table per side: CPU-s and wall-s per step (median of the steps after ``--warmup``),
the whole process's CPU-s (launcher, imports, model load, steps, checkpoint; both sides run as
one plain ``python`` process, ours under torchrun with ``--torchrun``), and as its last
line ``step_ratio=<ours/TRL CPU-s per step> process_ratio=<ours/TRL whole-process CPU-s>``
against TRL with its defaults (gradient checkpointing on).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, ".bench-venvs", "trl")
TORCH_PIN = "torch==2.13.0"
TRL_PIN = "trl==1.16.0"
DEMO = os.path.join(REPO, "examples", "data", "demo")

# The shared workload (one for both sides).
PROMPTS_PER_STEP = 16
N = 8
MAX_RESPONSE = 24
MAX_PROMPT = 32
LR = 1e-6
CLIP_LOW, CLIP_HIGH = 3e-4, 4e-4
SEED = 1


# ----------------------------------------------------------------------------- set-up
@functools.cache
def venv_python() -> str:
    """The TRL venv's interpreter, creating the venv and installing TRL on first use (probed once
    per process)."""
    python = os.path.join(VENV, "bin", "python")
    probe = [python, "-c", "import trl, torch; print(trl.__version__, torch.__version__)"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing {TORCH_PIN} and {TRL_PIN} into {VENV} (first use) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)  # first, so trl does not pull another torch
    subprocess.run(pip + [TRL_PIN], check=True)
    subprocess.run(probe, check=True)
    return python


def ensure_demo() -> None:
    sys.path.insert(0, REPO)
    from megatron_gad.data.demo import ensure_demo_assets

    ensure_demo_assets(DEMO)


# ----------------------------------------------------------------------------- our side
def our_overrides(run_dir: str, steps: int) -> list[str]:
    """examples/configs/gspo.yaml set to the shared workload (the demo's standard-mode data and student)."""
    return [
        f"data.train_files={os.path.join(DEMO, 'train_standard.parquet')}",
        f"actor_rollout_ref.model.path={os.path.join(DEMO, 'student')}",
        f"actor_rollout_ref.model.tokenizer_path={os.path.join(DEMO, 'tokenizer')}",
        f"custom_reward_function.path={os.path.join(REPO, 'megatron_gad', 'data', 'demo.py')}",
        "custom_reward_function.name=demo_reward",  # the function TRL's side calls
        f"data.train_batch_size={PROMPTS_PER_STEP}", f"data.max_prompt_length={MAX_PROMPT}",
        f"data.max_response_length={MAX_RESPONSE}", "actor_rollout_ref.rollout.name=cpu",
        f"actor_rollout_ref.rollout.n={N}", "actor_rollout_ref.rollout.temperature=1.0",
        f"actor_rollout_ref.actor.optim.lr={LR}", "actor_rollout_ref.actor.optim.clip_grad=1.0",
        f"actor_rollout_ref.actor.clip_ratio_low={CLIP_LOW}", f"actor_rollout_ref.actor.clip_ratio_high={CLIP_HIGH}",
        "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS_PER_STEP}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={PROMPTS_PER_STEP}",
        "actor_rollout_ref.actor.ppo_epochs=1",
        f"trainer.total_training_steps={steps}", "trainer.test_freq=-1", "trainer.val_before_train=false",
        "trainer.export_hf=false", "trainer.save_freq=-1", f"trainer.default_local_dir={run_dir}",
        "trainer.logger=[jsonl]", f"trainer.seed={SEED}",
    ]


def worker_ours(out_path: str, overrides: list[str]) -> None:
    """Run examples/pretrain_gad.py's main in this process (one rank: a plain ``python`` process,
    or torchrun's worker with ``--torchrun``), recording the CPU and wall seconds of every
    training step."""
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import pretrain_gad  # first, as `python examples/pretrain_gad.py` starts (its import-time set-up)
    from megatron_gad import trainer as trainer_mod

    steps: list[tuple[float, float]] = []
    original = trainer_mod.Trainer.train_step

    def timed_step(self, batch):
        cpu, wall = time.process_time(), time.perf_counter()
        result = original(self, batch)
        steps.append((time.process_time() - cpu, time.perf_counter() - wall))
        return result

    trainer_mod.Trainer.train_step = timed_step
    rc = pretrain_gad.cli(["--config", os.path.join(REPO, "examples", "configs", "gspo.yaml"), *overrides])
    if rc != 0:
        raise SystemExit(f"our side failed (exit {rc})")
    with open(out_path, "w") as f:
        json.dump({"steps": steps}, f)


# ----------------------------------------------------------------------------- TRL side
def worker_trl(out_path: str, run_dir: str, steps: int, gradient_checkpointing: bool | None) -> None:
    """GRPOTrainer (GSPO settings) on the same model, data and work per step."""
    import importlib.util

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    # demo.py needs megatron_gad.errors and megatron_gad.io (stdlib only); loaded by path, it
    # does not import megatron_gad.data (nor torch-side code of this checkout)
    sys.path.insert(0, REPO)
    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "megatron_gad", "data", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    sys.modules["demo"] = demo
    spec.loader.exec_module(demo)  # the demo's reward function, the same code our side calls

    def reward(prompts, completions, data_source, reward_model, extra_info, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [demo.demo_reward(ds, t, rm["ground_truth"], ei)
                for t, ds, rm, ei in zip(texts, data_source, reward_model, extra_info)]

    data = load_dataset("parquet", data_files=os.path.join(DEMO, "train_standard.parquet"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(DEMO, "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(DEMO, "student"), dtype="float32")
    sequences = PROMPTS_PER_STEP * N
    kwargs = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    config = GRPOConfig(
        output_dir=run_dir, use_cpu=True, seed=SEED, max_steps=steps, logging_steps=1, report_to=[],
        per_device_train_batch_size=PROMPTS_PER_STEP, gradient_accumulation_steps=sequences // PROMPTS_PER_STEP,
        steps_per_generation=sequences // PROMPTS_PER_STEP, num_generations=N, num_iterations=1,
        max_completion_length=MAX_RESPONSE, temperature=1.0, beta=0.0, loss_type="grpo",
        importance_sampling_level="sequence", epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        save_strategy="steps", save_steps=steps, bf16=False, fp16=False, dataloader_num_workers=0,
        **kwargs,
    )
    step_times: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = (time.process_time(), time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            step_times.append((time.process_time() - self.start[0], time.perf_counter() - self.start[1]))

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    with open(out_path, "w") as f:
        json.dump({"steps": step_times, "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}, f)


# ----------------------------------------------------------------------------- driver
def run_side(side: str, steps: int, work: str, index: int, torchrun: bool = False) -> dict:
    """One whole process of ``side``; returns its per-step times and whole-process CPU-s."""
    out = os.path.join(work, f"{side}-{index}.json")
    run_dir = os.path.join(work, f"{side}-{index}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    if side == "ours":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"] if torchrun else [sys.executable]
        cmd = [*launcher, os.path.abspath(__file__), "--worker", "ours", "--out", out, "--",
               *our_overrides(run_dir, steps)]
    else:
        gc = {"trl": None, "trl_nogc": False}[side]
        cmd = [venv_python(), os.path.abspath(__file__), "--worker", "trl", "--out", out, "--run-dir", run_dir,
               "--steps", str(steps)] + (["--no-gradient-checkpointing"] if gc is False else [])
        env.pop("PYTHONPATH")  # the TRL venv must not import this checkout's packages
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"error: the {side} run {index} failed (exit {proc.returncode}); its output is above")
    with open(out) as f:
        result = json.load(f)
    result["process_cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["process_wall"] = wall
    return result


def summarise(runs: list[dict], warmup: int) -> dict:
    cpu = [statistics.median(c for c, _ in r["steps"][warmup:]) for r in runs]
    wall = [statistics.median(w for _, w in r["steps"][warmup:]) for r in runs]
    return {"step_cpu": statistics.median(cpu), "step_wall": statistics.median(wall),
            "process_cpu": statistics.median(r["process_cpu"] for r in runs),
            "process_wall": statistics.median(r["process_wall"] for r in runs),
            "steps_outside": statistics.median(r["process_cpu"] - sum(c for c, _ in r["steps"]) for r in runs)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the per-step medians")
    parser.add_argument("--no-nogc", action="store_true", help="skip TRL without gradient checkpointing")
    parser.add_argument("--torchrun", action="store_true",
                        help="launch our side with torchrun (default: one plain process, as TRL's side)")
    parser.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "ours":
        worker_ours(args.out, args.overrides)
        return 0
    if args.worker == "trl":
        worker_trl(args.out, args.run_dir, args.steps, False if args.no_gradient_checkpointing else None)
        return 0
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    venv_python()
    ensure_demo()
    sides = ["ours", "trl"] + ([] if args.no_nogc else ["trl_nogc"])
    results: dict[str, list[dict]] = {s: [] for s in sides}
    work = tempfile.mkdtemp(prefix="vs_trl-")
    try:
        for i in range(args.runs):  # A B A B: the machine's load falls on both sides alike
            for side in sides:
                results[side].append(run_side(side, args.steps, work, i, args.torchrun))
                print(f"run {i + 1}/{args.runs} {side}: {results[side][-1]['process_cpu']:.1f} CPU-s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = {s: summarise(r, args.warmup) for s, r in results.items()}
    names = {"ours": "megatron_gad", "trl": "TRL (defaults: grad ckpt on)", "trl_nogc": "TRL (grad ckpt off)"}
    print(f"\n{args.steps} steps x {PROMPTS_PER_STEP * N} sequences, {args.runs} runs per side, "
          f"medians (steps after {args.warmup})")
    print(f"{'side':30s} {'CPU-s/step':>10s} {'wall-s/step':>11s} {'process CPU-s':>13s} "
          f"{'outside steps':>13s} {'process wall-s':>14s}")
    for side in sides:
        t = table[side]
        print(f"{names[side]:30s} {t['step_cpu']:10.3f} {t['step_wall']:11.3f} {t['process_cpu']:13.1f} "
              f"{t['steps_outside']:13.1f} {t['process_wall']:14.1f}")
    ours, trl = table["ours"], table["trl"]
    if "trl_nogc" in table:
        nogc = table["trl_nogc"]
        print(f"against TRL without gradient checkpointing: step_ratio={ours['step_cpu'] / nogc['step_cpu']:.2f} "
              f"process_ratio={ours['process_cpu'] / nogc['process_cpu']:.2f}")
    print(f"step_ratio={ours['step_cpu'] / trl['step_cpu']:.2f} process_ratio={ours['process_cpu'] / trl['process_cpu']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
