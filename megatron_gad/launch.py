"""A launcher that fails fast: check the whole run in one process, then start the workers.

    python examples/pretrain_gad.py --nproc-per-node N [--nnodes M --node-rank R --master-addr H
        --master-port P] [--check] [--config FILE.yaml] [dotted.key=value ...]
    megatron-gad-train --nproc-per-node N ...          (the same, as a console script)

The parent process loads the config for the run's world size (``N x M``), reads the model
directories (``config.json``, weights or ``model.random_init``, tokenizer), the training and
validation data (every row, as the trainer will) and the rollout engine's requirements (vLLM
needs CUDA). A user error there prints ONE line (``error: ...``) and exits 2 before any worker
exists. Otherwise it starts the workers with torch's elastic launch API (what torchrun runs),
each worker re-loads the config and trains. A worker's user error is written to a file instead
of stderr; the parent prints the first failing rank's line once and exits with that rank's code
(2), without torch's ``ChildFailedError`` traceback. ``--check`` stops after the checks (exit 0).

When verl's ``trainer.n_gpus_per_node`` / ``trainer.nnodes`` are given and ``--nproc-per-node``
is not, they choose the number of workers (verl's meaning). ``torchrun examples/pretrain_gad.py``
keeps working: under torchrun the script runs in-process as before.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from typing import Any

from megatron_gad.errors import UserError

#: A worker started by this launcher writes its one-line user error under this directory.
ERROR_DIR_ENV = "MEGATRON_GAD_ERROR_DIR"
LAUNCHER_FLAGS = ("--nproc-per-node", "--nproc_per_node", "--nnodes", "--check")


def launcher_requested(argv: list[str]) -> bool:
    """Whether the command line asks for this launcher: a launcher flag, or verl's world-size keys
    outside torchrun (``trainer.n_gpus_per_node=...``)."""
    if under_torchrun():
        return False
    for item in argv:
        flag = item.split("=", 1)[0]
        if flag in LAUNCHER_FLAGS or flag.lstrip("+") in ("trainer.n_gpus_per_node", "trainer.nnodes"):
            return True
    return False


def under_torchrun() -> bool:
    """This process is a worker of torchrun / elastic launch (it has a rank in its environment)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The launcher's flags, the config file and the dotted overrides."""
    p = argparse.ArgumentParser(prog="megatron-gad-train", description="Check a GAD/PPO run, then start N workers.")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=None, dest="nproc_per_node",
                   help="workers on this node (default: trainer.n_gpus_per_node, else 1)")
    p.add_argument("--nnodes", type=int, default=None, help="nodes (default: trainer.nnodes, else 1)")
    p.add_argument("--node-rank", "--node_rank", type=int, default=0, dest="node_rank", help="this node's rank")
    p.add_argument("--master-addr", "--master_addr", default="127.0.0.1", dest="master_addr",
                   help="rendezvous host of node 0 (several nodes)")
    p.add_argument("--master-port", "--master_port", type=int, default=29500, dest="master_port",
                   help="rendezvous port on node 0 (several nodes)")
    p.add_argument("--check", action="store_true", help="only run the checks (exit 0 when the run can start)")
    return parse_run_args(p, argv)


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Add the arguments every entry point takes (``--config``, dotted overrides) to ``parser``
    and parse ``argv``; an override without ``=`` is a usage error (exit 2)."""
    parser.add_argument("--config", help="YAML config file (default: the embedded demo)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.critic_warmup=10")
    args = parser.parse_args(argv)
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"override {item!r} is not of the form dotted.key=value")
    return args


def world_layout(args: argparse.Namespace) -> tuple[int, int]:
    """(workers per node, nodes): the flags, else verl's keys, else (1, 1)."""
    from megatron_gad.config.load import read_yaml
    from megatron_gad.config.verl_compat import world_from_keys

    verl = world_from_keys(read_yaml(args.config) if args.config else {}, args.overrides)
    nproc = args.nproc_per_node or (verl[0] if verl else 1)
    nnodes = args.nnodes or (verl[1] if verl else 1)
    if nproc < 1 or nnodes < 1:
        raise UserError(f"--nproc-per-node ({nproc}) and --nnodes ({nnodes}) must be >= 1")
    return nproc, nnodes


def preflight(config_path: str, overrides: list[str], world_size: int) -> Any:
    """Everything a run checks before building a model, in this process: the config at
    ``world_size``, the model and tokenizer directories and weights, every data row, the mode's
    requirements and the rollout engine. Returns the config; raises a UserError naming what is
    wrong."""
    from megatron_gad.config import load_config
    from megatron_gad.trainer_setup import read_run_inputs

    cfg = load_config(config_path, overrides, world_size=world_size)
    read_run_inputs(cfg)  # what every rank reads before building a model, checked once here
    if cfg.custom_reward_function.path:
        from megatron_gad.rewards import load_reward_fn

        load_reward_fn(cfg.custom_reward_function.path, cfg.custom_reward_function.name)
    return cfg


def launch(argv: list[str], script: str) -> int:
    """The parent process: checks, then ``nproc x nnodes`` workers running ``script`` (this
    node's share). Returns the exit code: 0, 2 for a user error (one line on stderr), or the
    first failing worker's code."""
    from megatron_gad.quiet import quiet_third_party

    quiet_third_party()
    args = parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(script)))  # the checkout of the worker script
    demo = is_demo_config(args.config, repo)
    config_path = demo_config_path(repo) if demo else args.config
    try:
        nproc, nnodes = world_layout(args)
        if demo:
            os.chdir(repo)  # the demo config's paths are relative to the repository root
            prepare_demo_assets(repo)
        cfg = preflight(config_path, args.overrides, nproc * nnodes)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"[megatron_gad] checks passed: {config_summary(cfg, nproc * nnodes)}", flush=True)
    if args.check:
        return 0
    worker_args = [script, *(["--config", config_path] if config_path else []), *args.overrides]
    return start_workers(worker_args, nproc, nnodes, args)


def start_workers(worker_args: list[str], nproc: int, nnodes: int, args: argparse.Namespace) -> int:
    """Run ``python worker_args...`` as ``nproc`` local workers of an ``nproc x nnodes`` world
    (torch elastic launch, no restarts). Returns 0, or the code of the first worker that failed
    after printing its one-line error (read from the worker's error file)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # our line replaces its report
    with tempfile.TemporaryDirectory(prefix="megatron_gad_errors.") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        single = nnodes == 1
        config = LaunchConfig(
            min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
            rdzv_backend="c10d" if single else "static",
            rdzv_endpoint="localhost:0" if single else f"{args.master_addr}:{args.master_port}",
            rdzv_configs={} if single else {"rank": args.node_rank}, max_restarts=0, start_method="spawn",
        )
        try:
            elastic_launch(config, sys.executable)(*worker_args)
        except ChildFailedError as exc:
            return report_failure(exc, errors)
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)
    return 0


def report_failure(exc: Any, errors_dir: str) -> int:
    """Print the first failing worker's one-line error (or its exit code) and return its code."""
    failures = sorted(exc.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    for rank, failure in failures:
        path = os.path.join(errors_dir, f"rank{rank}.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                print(f.read().strip(), file=sys.stderr, flush=True)
            return failure.exitcode if failure.exitcode > 0 else 1
    rank, failure = failures[0]
    code = failure.exitcode
    what = f"exit code {code}" if code >= 0 else f"signal {-code}"
    print(f"error: worker rank {rank} stopped with {what} (its output is above)", file=sys.stderr, flush=True)
    return code if code > 0 else 1


def report_worker_error(exc: BaseException) -> None:
    """A worker's one-line user error: into the launcher's error file when started by
    :func:`launch` (the parent prints it once), else on stderr (torchrun, a single process)."""
    line = f"error: {exc}"
    errors = os.environ.get(ERROR_DIR_ENV)
    if errors and os.path.isdir(errors):
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(errors, f"rank{rank}.txt"), "w", encoding="utf-8") as f:
            f.write(line + "\n")
        return
    print(line, file=sys.stderr, flush=True)


def config_summary(cfg: Any, world_size: int) -> str:
    """One line describing the run (the full config is saved as ``<run dir>/config.yaml`` and
    printed with ``trainer.print_config=true``)."""
    actor_rollout = cfg.actor_rollout_ref
    layout = actor_rollout.megatron
    model_parallel = layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size
    return (f"{actor_rollout.actor.policy_loss} + {cfg.algorithm.adv_estimator}, actor {actor_rollout.model.path}, "
            f"world {world_size} (TP {layout.tensor_model_parallel_size} x PP "
            f"{layout.pipeline_model_parallel_size} x DP {max(world_size // model_parallel, 1)}), "
            f"rollout {actor_rollout.rollout.name} n={actor_rollout.rollout.n}, {cfg.data.train_batch_size} prompts/step, "
            f"run dir {cfg.trainer.default_local_dir}")


def demo_config_path(repo: str) -> str:
    """The demo config of the checkout at ``repo``."""
    return os.path.join(repo, "examples", "configs", "demo.yaml")


def is_demo_config(config_path: str | None, repo: str) -> bool:
    """No config (the embedded demo) or the checkout's ``examples/configs/demo.yaml``."""
    return config_path is None or os.path.realpath(config_path) == os.path.realpath(demo_config_path(repo))


def prepare_demo_assets(repo: str, timeout_s: float = 600.0) -> None:
    """Rank 0 generates the demo assets under ``<repo>/examples/data/demo`` if absent
    (atomically); the other ranks wait for them."""
    import time

    from megatron_gad.data.demo import DemoAssetsError, assets_fresh, ensure_demo_assets

    assets = os.path.join(repo, "examples", "data", "demo")
    if int(os.environ.get("RANK", "0")) == 0:
        ensure_demo_assets(assets)
        return
    deadline = time.monotonic() + timeout_s
    while not assets_fresh(assets):  # the set rank 0 accepts, not a stale one it is replacing
        if time.monotonic() > deadline:
            raise DemoAssetsError(f"rank 0 did not produce the demo assets in {assets} within {timeout_s:.0f}s")
        time.sleep(0.5)


def console_main() -> None:
    """``megatron-gad-train``: the launcher with the repository's ``examples/pretrain_gad.py``
    as the worker script."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "pretrain_gad.py")
    if not os.path.isfile(script):
        print(f"error: {script} is missing (megatron-gad-train runs from a source checkout)", file=sys.stderr)
        sys.exit(2)
    sys.exit(launch(sys.argv[1:], script))
