"""Train a student with Generative Adversarial Distillation (or PPO / GSPO) on megatron-core.

    torchrun --nproc_per_node N examples/pretrain_gad.py [--config FILE.yaml] [dotted.key=value ...]
    python examples/pretrain_gad.py --nproc-per-node N [--check] [--config FILE.yaml] [dotted.key=value ...]

The second form (megatron_gad/launch.py) checks config, model directories and data in one process
first (one line and exit 2 on a user error), then starts the N workers itself.

With no arguments it runs the embedded CPU demo (examples/configs/demo.yaml): the tiny addition
task whose data, tokenizer and model configs are generated under examples/data/demo/ on first use.
The mode follows from the data: rows with ``teacher_response`` train GAD.
"""

import argparse
import os
import sys

from megatron_gad.runtime.cpu_shims import skip_jit_fuser

skip_jit_fuser()  # first, before anything imports megatron-core: on CPU its fused functions never run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    from megatron_gad.launch import parse_run_args

    args = parse_run_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), argv)
    return args.config, args.overrides


def main(argv: list[str]) -> int:
    from megatron_gad.launch import (config_summary, demo_config_path, is_demo_config, launch, launcher_requested,
                                     prepare_demo_assets, report_worker_error)
    from megatron_gad.quiet import quiet_third_party

    if launcher_requested(argv):  # --nproc-per-node N ...: check in this process, then start workers
        return launch(argv, os.path.abspath(__file__))
    config_path, overrides = parse_args(argv)
    quiet_third_party()
    demo = is_demo_config(config_path, REPO)  # also --config examples/configs/demo.yaml: assets on demand
    if demo:
        os.chdir(REPO)  # the demo config's paths are relative to the repository root
        config_path = demo_config_path(REPO)

    from megatron_gad.config import format_config, load_config
    from megatron_gad.errors import UserError
    from megatron_gad.trainer import TrainingStopped, run

    try:
        cfg = load_config(config_path, overrides)
        if demo:
            prepare_demo_assets(REPO)
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_config(cfg) if cfg.trainer.print_config else
                  f"[megatron_gad] {config_summary(cfg, int(os.environ.get('WORLD_SIZE', '1')))} "
                  "(full config: <run dir>/config.yaml, or trainer.print_config=true)", flush=True)
        run(cfg)
    except (UserError, TrainingStopped) as exc:  # a bad input, or a run stopped on purpose; others keep their traceback
        report_worker_error(exc)
        return 2
    return 0


def cli(argv: list[str]) -> int:
    """:func:`main`, for a process that ends when it returns: everything alive is then frozen out
    of the garbage collector, whose collection at interpreter exit would scan it all (~1 CPU-s
    for nothing: exit frees it anyway)."""
    import gc

    code = main(argv)
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
