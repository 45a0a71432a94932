"""Fixed-seed metrics of four short runs of one checkout, to show a clean-up changes no number.

    python scripts/fixed_seed_metrics.py run CHECKOUT OUT      # OUT/metrics.json
    python scripts/fixed_seed_metrics.py compare A/metrics.json B/metrics.json

``run`` trains, from the demo's assets and ``trainer.seed`` 1, GAD + GSPO on two data-parallel
ranks, GAD + PPO, standard PPO and pure GSPO, each 6 steps (2 SFT and 1 critic-only step for the
GAD runs) with a validation pass at step 6 (teacher-forced on the GAD runs), one thread per rank,
and keeps every logged value except ``timing/*`` and ``perf/*``. ``compare`` prints each value
that differs and the count; it exits 1 when any does. Run ``run`` once per checkout (for example
a ``git worktree`` of the commit before a change and one of the change).
"""

from __future__ import annotations

import json
import os
import sys

RUNS = {  # name: (config, GAD data, world size, extra overrides)
    "gad_gspo": ("gad_gspo.yaml", True, 2, {}),
    "gad_ppo": ("gad_ppo.yaml", True, 1, {}),
    "ppo": ("ppo.yaml", False, 1, {"actor_rollout_ref.rollout.n": 1}),
    "gspo": ("gspo.yaml", False, 1, {}),
}


def overrides(repo: str, assets, gad: bool, run_dir: str, extra: dict) -> list[str]:
    base = {
        "data.train_files": assets.train_file if gad else assets.train_standard_file,
        "data.val_files": assets.val_file if gad else assets.val_standard_file,
        "data.train_batch_size": 4, "data.val_batch_size": 8, "data.max_prompt_length": 32,
        "data.max_response_length": 24, "actor_rollout_ref.model.path": assets.student_dir,
        "actor_rollout_ref.model.tokenizer_path": assets.tokenizer_dir, "critic.model.path": assets.discriminator_dir,
        "actor_rollout_ref.rollout.name": "cpu", "actor_rollout_ref.rollout.n": 2,
        "actor_rollout_ref.ppo_mini_batch_size": 4, "actor_rollout_ref.ppo_micro_batch_size_per_gpu": 4,
        "critic.ppo_mini_batch_size": 4, "trainer.total_training_steps": 6, "trainer.total_epochs": 1,
        "trainer.default_local_dir": run_dir, "trainer.save_freq": -1, "trainer.test_freq": 6,
        "trainer.val_before_train": False, "trainer.logger": "jsonl", "trainer.seed": 1,
        "trainer.generator_warmup_steps": 2 if gad else 0, "trainer.critic_warmup": 1, "trainer.export_hf": False,
    }
    if gad:
        base["trainer.teacher_forced_validation"] = True
    else:
        base["custom_reward_function.path"] = os.path.join(repo, "megatron_gad", "data", "demo.py")
        base["custom_reward_function.name"] = "demo_reward"
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(config_path: str, args: list[str]) -> dict:
    from megatron_gad.config import load_config
    from megatron_gad.trainer import Trainer

    return Trainer(load_config(config_path, args)).fit()


def run(repo: str, out: str) -> None:
    repo, out = os.path.abspath(repo), os.path.abspath(out)
    sys.path.insert(0, repo)  # this checkout's package, ahead of any installed one
    from megatron_gad.data.demo import ensure_demo_assets
    from megatron_gad.runtime.spawn import run_distributed

    assets = ensure_demo_assets(os.path.join(out, "assets"))
    result = {}
    for name, (config, gad, world, extra) in RUNS.items():
        run_dir = os.path.join(out, name)
        args = overrides(repo, assets, gad, run_dir, extra)
        run_distributed(_train, world, args=(os.path.join(repo, "examples", "configs", config), args), timeout_s=900)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        result[name] = [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/"))} for r in rows]
        print(f"{name}: {len(rows)} steps, {sum(map(len, result[name]))} values", flush=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=0, sort_keys=True)


def compare(a_path: str, b_path: str) -> int:
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    values = differences = 0
    for name in sorted(set(a) | set(b)):
        rows_a, rows_b = a.get(name, []), b.get(name, [])
        if len(rows_a) != len(rows_b):
            print(f"{name}: {len(rows_a)} against {len(rows_b)} logged steps")
            differences += 1
        for step, (ra, rb) in enumerate(zip(rows_a, rows_b), 1):
            for key in sorted(set(ra) | set(rb)):
                values += 1
                if ra.get(key) != rb.get(key):
                    differences += 1
                    print(f"{name} step {step} {key}: {ra.get(key)!r} != {rb.get(key)!r}")
    print(f"{values} values compared, {differences} differences")
    return 1 if differences else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if len(sys.argv) == 4 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
