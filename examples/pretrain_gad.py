"""Train a student with Generative Adversarial Distillation (or PPO / GSPO) on megatron-core.

    torchrun --nproc_per_node N examples/pretrain_gad.py [--config FILE.yaml] [dotted.key=value ...]

With no arguments it runs the embedded CPU demo (examples/configs/demo.yaml): the tiny addition
task whose data, tokenizer and model configs are generated under examples/data/demo/ on first use.
The mode follows from the data: rows with ``teacher_response`` train GAD.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "examples", "configs", "demo.yaml")
DEMO_ASSETS = os.path.join(REPO, "examples", "data", "demo")


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file (default: the embedded demo)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.critic_warmup=10")
    args = parser.parse_args(argv)
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"override {item!r} is not of the form dotted.key=value")
    return args.config, args.overrides


def prepare_demo_assets(timeout_s: float = 600.0) -> None:
    """Rank 0 generates the demo assets if absent (atomically); the other ranks wait for them."""
    import time

    from megatron_gad.data.demo import DemoAssetsError, ensure_demo_assets, read_manifest

    if int(os.environ.get("RANK", "0")) == 0:
        ensure_demo_assets(DEMO_ASSETS)
        return
    deadline = time.monotonic() + timeout_s
    while read_manifest(DEMO_ASSETS) is None:
        if time.monotonic() > deadline:
            raise DemoAssetsError(f"rank 0 did not produce the demo assets in {DEMO_ASSETS} within {timeout_s:.0f}s")
        time.sleep(0.5)


def quiet_cpu_only_warnings() -> None:
    """Without CUDA, Transformer Engine and apex cannot exist: megatron-core's notices that it
    falls back to torch implementations are noise there (they stay on GPU machines)."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)


def main(argv: list[str]) -> int:
    config_path, overrides = parse_args(argv)
    quiet_cpu_only_warnings()
    demo = config_path is None
    if demo:
        os.chdir(REPO)  # the demo config's paths are relative to the repository root
        config_path = DEMO_CONFIG

    from megatron_gad.config import format_config, load_config
    from megatron_gad.errors import UserError
    from megatron_gad.trainer import TrainingStopped, run

    try:
        cfg = load_config(config_path, overrides)
        if demo:
            prepare_demo_assets()
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_config(cfg), flush=True)
        run(cfg)
    except (UserError, TrainingStopped) as exc:  # a bad input, or a run stopped on purpose; others keep their traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
