"""GAD against SeqKD (SFT on the teacher's responses only) at the same step budget and seeds.

Both arms train the demo student from the same shipped initial weights on an embedded demo task
(default: ``styles``, the teacher answering in one of three styles at random), through the real
entry point ``examples/pretrain_gad.py`` with ``examples/configs/demo_styles.yaml``, one process
per run. SeqKD fine-tunes on the teacher responses for every step
(``trainer.generator_warmup_steps = steps``); GAD runs the config's recipe (generator warmup,
discriminator-only steps, then GAD + GSPO). Both validate once, after the last step, on the 200
held-out prompts. The table gives mean +- sample standard deviation over the seeds of:

* ``one_style_sampled``: share of sampled answers (one per prompt, at the rollout temperature)
  that are exactly one complete teacher style, no blend and nothing after it (the checker metric);
* ``valid_sampled``: the same, also with the prompt's operands and one consistent sum;
* ``one_style_greedy``, ``valid_greedy``, ``correct_greedy`` (valid with the right sum): the
  same checks on greedy answers;
* ``val/teacher_token_agreement`` and ``val/teacher_log_prob``;
* wall seconds and CPU seconds (user + sys of the run's process tree) per run.

The last line is ``gad=<x> seqkd=<y>``: the two arms' mean ``one_style_sampled``.

    python benchmarks/gad_vs_seqkd.py [--seeds 1 2 3] [--steps 120] [--jobs 2] [--threads 1]
        [--gad KEY=VALUE ...] [--seqkd KEY=VALUE ...] [--out DIR] [--task styles|arith]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "demo_styles.yaml"
COLUMNS = (
    ("one_style_sampled", "val/checker_one_style_sampled"),
    ("valid_sampled", "val/checker_valid_sampled"),
    ("one_style_greedy", "val/checker_one_style"),
    ("valid_greedy", "val/checker_valid"),
    ("correct_greedy", "val/checker_correct"),
    ("teacher_token_agreement", "val/teacher_token_agreement"),
    ("teacher_log_prob", "val/teacher_log_prob"),
)

def arm_overrides(arm: str, steps: int, args: argparse.Namespace) -> list[str]:
    """The dotted overrides of one arm (beside the shared ones)."""
    if arm == "seqkd":
        return [f"trainer.generator_warmup_steps={steps}", "trainer.critic_warmup=0", *args.seqkd]
    return list(args.gad)


def run_one(arm: str, seed: int, assets: Path, out: Path, args: argparse.Namespace) -> dict:
    """Train one (arm, seed) in a child process; its final validation metrics, wall and CPU s."""
    shared = [
        f"data.train_files={assets / 'train.parquet'}", f"data.val_files={assets / 'val.parquet'}",
        f"actor_rollout_ref.model.path={assets / 'student'}",
        f"actor_rollout_ref.model.tokenizer_path={assets / 'tokenizer'}",
        f"critic.model.path={assets / 'discriminator'}",
    ]
    return train_arm(arm, seed, out, args, CONFIG, shared, COLUMNS)


def train_arm(arm: str, seed: int, out: Path, args: argparse.Namespace, config: Path, shared: list[str],
              columns: tuple[tuple[str, str], ...]) -> dict:
    """Train one (arm, seed) of ``config`` with the dotted overrides ``shared`` and the arm's own,
    in a child process (``args.steps`` steps, validation once after the last); the last logged
    row's ``columns`` (name, metric key) with wall and CPU seconds (user + sys of the process
    tree) and its peak RSS in GiB (``peak_rss_gib``: the largest process of the tree). The run's
    directory is ``out/<arm>-seed<seed>`` (``metrics.jsonl`` there), its output beside it (``.log``)."""
    run_dir = out / f"{arm}-seed{seed}"
    shared = [
        *shared,
        f"trainer.seed={seed}", f"trainer.total_training_steps={args.steps}", f"trainer.test_freq={args.steps}",
        "trainer.save_freq=-1", "trainer.export_hf=false", "trainer.resume_mode=disable",
        "trainer.val_before_train=false", "trainer.logger=jsonl", f"trainer.default_local_dir={run_dir}",
    ]
    cmd = [sys.executable, str(REPO / "examples" / "pretrain_gad.py"), "--config", str(config), *shared,
           *arm_overrides(arm, args.steps, args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{arm} seed {seed} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = rows[-1]
    missing = [key for _, key in columns if key not in final]
    if missing:
        raise RuntimeError(f"{arm} seed {seed}: the last step logged no {', '.join(missing)}; see {log}")
    result = {name: float(final[key]) for name, key in columns}
    result.update(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_gib=usage.ru_maxrss / 2**20)
    return result


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="trainer.seed of each run")
    parser.add_argument("--steps", type=int, default=120, help="training steps of every run (the budget)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--task", choices=("styles", "arith"), default="styles", help="embedded demo task")
    parser.add_argument("--gad", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the GAD arm")
    parser.add_argument("--seqkd", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the SeqKD arm")
    parser.add_argument("--arms", nargs="+", choices=("gad", "seqkd"), default=["gad", "seqkd"])
    parser.add_argument("--out", help="working directory (default: a temporary one, removed after)")
    args = parser.parse_args(argv)

    from megatron_gad.data.demo import ensure_demo_assets

    tmp, out = work_dir(args, "gad_vs_seqkd-")
    assets = ensure_demo_assets(out / f"assets-{args.task}", task=args.task).root
    by_arm, start = run_all(args, lambda arm, seed: run_one(arm, seed, assets, out, args))

    names = [name for name, _ in COLUMNS] + ["wall_s", "cpu_s"]
    print(f"\n{args.task} task, {args.steps} steps, seeds {args.seeds}, {args.threads} thread(s) per run, "
          f"{args.jobs} at once; {time.monotonic() - start:.0f} s in all")
    means = print_table(by_arm, names)
    if tmp is not None:
        tmp.cleanup()
    print_last_line(means, names[0])
    return 0


def work_dir(args: argparse.Namespace, prefix: str) -> tuple[tempfile.TemporaryDirectory | None, Path]:
    """(the temporary directory to clean up, or None with ``--out``; the absolute working directory)."""
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix=prefix)
    return tmp, Path(args.out or tmp.name).absolute()


def run_all(args: argparse.Namespace, train: Callable[[str, int], dict]) -> tuple[dict[str, list[dict]], float]:
    """Run ``train(arm, seed)`` for every arm of ``args.arms`` and seed of ``args.seeds``,
    ``args.jobs`` at once, and print each run's figures in that order; returns the results by arm
    (in seed order) and the ``time.monotonic()`` at the start."""
    jobs = [(arm, seed) for arm in args.arms for seed in args.seeds]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: train(*job), jobs))
    by_arm: dict[str, list[dict]] = {}
    for (arm, seed), res in zip(jobs, results):
        by_arm.setdefault(arm, []).append(res)
        print(f"{arm} seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
    return by_arm, start


def print_last_line(means: dict[tuple[str, str], float], name: str) -> None:
    """The benchmark's last line: ``gad=<x> seqkd=<y>``, the arms' means of ``name`` (nan for an arm not run)."""
    gad, seqkd = means.get(("gad", name), float("nan")), means.get(("seqkd", name), float("nan"))
    print(f"gad={gad:.3f} seqkd={seqkd:.3f}")


def print_table(by_arm: dict[str, list[dict]], names: list[str]) -> dict[tuple[str, str], float]:
    """Print a markdown row per arm of mean +- spread over its runs of each of ``names`` (seconds,
    ``*_s``, without decimals); returns the means by (arm, name)."""
    print("| arm | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    means = {}
    for arm, res in by_arm.items():
        cells = []
        for name in names:
            m, s = mean_spread([r[name] for r in res])
            cells.append(f"{m:.3f} ± {s:.3f}" if not name.endswith("_s") else f"{m:.0f} ± {s:.0f}")
            means[(arm, name)] = m
        print(f"| {arm} | " + " | ".join(cells) + " |")
    return means


if __name__ == "__main__":
    sys.exit(main())
