"""GAD against SeqKD on a real pretrained teacher: SmolLM2-135M-Instruct into its first k layers.

The data and models come from ``examples/real_model/prepare_smollm2.py`` (the teacher's greedy
answers to short factual questions; held-out facts for validation); the script runs it first when
``--data`` holds no prepared directory (needs ``pip install -e .[real]``). Both arms then train the
same layer-pruned student from the same initial weights through the real entry point
``examples/pretrain_gad.py`` with ``examples/configs/smollm2_distill.yaml``, one process per run,
at the same step budget (the machinery of ``benchmarks/gad_vs_seqkd.py``):

* SeqKD: SFT on the teacher's answers for every step (``trainer.generator_warmup_steps = steps``);
* GAD: ``--warmup`` SFT steps, ``--critic-warmup`` discriminator-only steps, then GAD + GSPO.

Both validate once, after the last step, on the held-out prompts. The table gives, per arm:

* ``correct_greedy`` (``val/reward``): share of the student's greedy answers that contain the
  fact's accepted answer (the checker ``compute_score`` of ``examples/real_model/smollm2_facts.py``)
  - the primary metric, chosen before any run;
* ``val/teacher_log_prob``, ``val/teacher_token_agreement``, ``val/teacher_exact_match``;
* wall and CPU seconds (user + sys of the run's process tree) and peak RSS (GiB) per run;

then the mean wall seconds per step of each phase (SFT, discriminator-only, GAD) with the parts
that dominate it. One seed by default (each run takes minutes here). The last line is
``gad=<x> seqkd=<y>`` on ``correct_greedy``.

    python benchmarks/smollm2_gad_vs_seqkd.py [--data DIR] [--steps 40] [--warmup 20]
        [--critic-warmup 4] [--seeds 1] [--jobs 2] [--threads 1] [--out DIR]
        [--gad KEY=VALUE ...] [--seqkd KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gad_vs_seqkd import (  # noqa: E402  (the shared machinery)
    print_last_line,
    print_table,
    run_all,
    train_arm,
    work_dir,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "smollm2_distill.yaml"
PREPARE = REPO / "examples" / "real_model" / "prepare_smollm2.py"
CHECKER = REPO / "examples" / "real_model" / "smollm2_facts.py"
COLUMNS = (
    ("correct_greedy", "val/reward"),
    ("teacher_log_prob", "val/teacher_log_prob"),
    ("teacher_token_agreement", "val/teacher_token_agreement"),
    ("teacher_exact_match", "val/teacher_exact_match"),
)
PHASE_PARTS = ("rollout", "old_log_prob", "score", "critic_update", "actor_update")


def ensure_data(args: argparse.Namespace) -> tuple[Path, dict]:
    """The prepared directory and its manifest; runs the prepare step when it is missing."""
    data = Path(args.data).absolute()
    manifest = data / "manifest.json"
    if not manifest.is_file():
        cmd = [sys.executable, str(PREPARE), "--out", str(data), "--student-layers", str(args.student_layers),
               "--train", str(args.train), "--val", str(args.val), "--max-new-tokens", str(args.response_length)]
        print("preparing: " + " ".join(cmd[1:]), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print(f"error: the prepare step failed (exit {code}); see its message above", file=sys.stderr)
            sys.exit(code)
        print(f"prepared in {time.monotonic() - start:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} CPU s, "
              f"peak RSS {usage.ru_maxrss / 2**20:.2f} GiB", flush=True)
    info = json.loads(manifest.read_text())
    if info.get("prompts") != "facts":
        print(f"error: {data} was prepared with --prompts {info.get('prompts', 'addition')}; this benchmark "
              "scores the factual prompts (prepare with the default --prompts facts)", file=sys.stderr)
        sys.exit(2)
    return data, info


def phase_times(run_dir: Path) -> dict[str, dict[str, float]]:
    """Mean wall seconds per step of each phase (``sft``, ``disc``: discriminator only, ``gad``)
    for ``timing/step`` and :data:`PHASE_PARTS`, from the run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_phase: dict[str, list[dict]] = {}
    for row in rows:
        if "timing/step" not in row:
            continue
        phase = ("sft" if row.get("trainer/generator_warmup") else
                 "gad" if row.get("trainer/actor_updated") else "disc")
        by_phase.setdefault(phase, []).append(row)
    return {phase: {"steps": len(rs), **{part: statistics.fmean(r.get(f"timing/{part}", 0.0) for r in rs)
                                         for part in ("step", *PHASE_PARTS)}}
            for phase, rs in by_phase.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "examples" / "data" / "smollm2"),
                        help="prepared directory (made by the prepare step when missing)")
    parser.add_argument("--student-layers", type=int, default=6, help="for the prepare step")
    parser.add_argument("--train", type=int, default=320, help="training prompts, for the prepare step")
    parser.add_argument("--val", type=int, default=32, help="held-out prompts, for the prepare step")
    parser.add_argument("--response-length", type=int, default=24,
                        help="longest teacher answer (for the prepare step) and student response")
    parser.add_argument("--steps", type=int, default=40, help="training steps of every run (the budget)")
    parser.add_argument("--warmup", type=int, default=20, help="GAD arm: SFT steps first")
    parser.add_argument("--critic-warmup", type=int, default=4, help="GAD arm: discriminator-only steps next")
    parser.add_argument("--prompts-per-step", type=int, default=8, help="data.train_batch_size")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt (rollout n)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="trainer.seed of each run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--gad", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the GAD arm")
    parser.add_argument("--seqkd", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the SeqKD arm")
    parser.add_argument("--arms", nargs="+", choices=("gad", "seqkd"), default=["gad", "seqkd"])
    parser.add_argument("--out", help="working directory (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup + args.critic_warmup < args.steps:
        parser.error(f"--warmup {args.warmup} + --critic-warmup {args.critic_warmup} must leave GAD steps "
                     f"within --steps {args.steps}")

    data, info = ensure_data(args)
    batch = args.prompts_per_step
    shared = [
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'val.parquet'}",
        f"actor_rollout_ref.model.path={data / 'student'}", f"critic.model.path={data / 'student'}",
        f"custom_reward_function.path={CHECKER}",
        f"data.max_response_length={info['max_new_tokens']}", f"data.train_batch_size={batch}",
        f"data.val_batch_size={min(16, info['n_val'])}", f"actor_rollout_ref.rollout.n={args.samples}",
        f"actor_rollout_ref.ppo_mini_batch_size={batch}", f"actor_rollout_ref.ppo_micro_batch_size_per_gpu={batch}",
        f"trainer.total_epochs={-(-args.steps * batch // info['n_train'])}",  # enough epochs for the steps
        "trainer.log_val_generations=8",  # the first 8 greedy answers, in <run dir>/val_generations.jsonl
    ]
    # SeqKD's own step count comes from arm_overrides (generator_warmup_steps = steps, no critic warmup)
    args.gad = [f"trainer.generator_warmup_steps={args.warmup}", f"trainer.critic_warmup={args.critic_warmup}",
                *args.gad]
    tmp, out = work_dir(args, "smollm2_gad_vs_seqkd-")
    by_arm, start = run_all(args, lambda arm, seed: train_arm(arm, seed, out, args, CONFIG, shared, COLUMNS))
    phases = {f"{arm} seed {seed}": phase_times(out / f"{arm}-seed{seed}")
              for arm in args.arms for seed in args.seeds}

    names = [name for name, _ in COLUMNS] + ["wall_s", "cpu_s", "peak_rss_gib"]
    print(f"\nSmolLM2-135M-Instruct -> {info['student_layers']} layers, {info['n_val']} held-out prompts; "
          f"{args.steps} steps of {batch} prompts x {args.samples} samples of at most {info['max_new_tokens']} "
          f"tokens (GAD: {args.warmup} SFT, {args.critic_warmup} discriminator-only, "
          f"{args.steps - args.warmup - args.critic_warmup} GAD); seeds {args.seeds}, {args.threads} thread(s) "
          f"per run, {args.jobs} at once; {time.monotonic() - start:.0f} s in all")
    means = print_table(by_arm, names)
    print("\nwall s per step, by phase (mean over its steps)")
    print("| run | phase | steps | step | " + " | ".join(PHASE_PARTS) + " |")
    print("|---|---|---|---|" + "---|" * len(PHASE_PARTS))
    for run, table in phases.items():
        for phase, t in table.items():
            print(f"| {run} | {phase} | {t['steps']} | {t['step']:.1f} | "
                  + " | ".join(f"{t[p]:.1f}" for p in PHASE_PARTS) + " |")
    if tmp is not None:
        tmp.cleanup()
    print_last_line(means, names[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
