"""Load a :class:`TrainConfig` from a YAML file plus dotted command-line overrides; save/print it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from megatron_gad.config import verl_compat
from megatron_gad.config.checks import merge_actor_keys, resolve_defaults, validate_config
from megatron_gad.config.fields import (
    ConfigError,
    check_override_path,
    flat_keys,
    from_dict,
    parse_override,
    set_in,
    to_dict,
)
from megatron_gad.config.schema import TrainConfig
from megatron_gad.io import atomic_write_text


def read_yaml(path: str) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; ConfigError naming the file otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse config file {path}: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> set[str]:
    """Apply dotted overrides to the raw mapping ``tree`` in order; returns the keys they set.

    Each key is checked against the config tree first, so a misspelt override fails naming it.
    """
    keys = set()
    for text in overrides:
        path, value = parse_override(text)
        check_override_path(TrainConfig, path, f"override {text!r}")
        set_in(tree, path, value)
        keys.add(".".join(path))
    return keys


def load_config(yaml_path: str | None, overrides: Sequence[str] = (), world_size: int | None = None) -> TrainConfig:
    """Build the run's config: defaults <- YAML file <- overrides, then resolve and check it.

    ``overrides`` are ``dotted.key=value`` strings as on the command line (later ones win);
    verl's keys among them and in the file are translated first (:mod:`verl_compat`).
    Values are typed by the dataclass fields. Raises :class:`ConfigError` (one line, naming the
    key) for unknown keys, bad values and failed cross-field checks (see ``checks.py``). Called on
    every rank, before any process group or model exists; ``world_size`` defaults to $WORLD_SIZE.
    """
    tree = read_yaml(yaml_path) if yaml_path else {}
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    tree, overrides = verl_compat.translate(tree, overrides, world)  # verl's keys: ours, or refused
    yaml_keys = flat_keys(tree)
    cli_keys = apply_overrides(tree, overrides)
    source = f" (config file {yaml_path})" if yaml_path else ""
    try:
        cfg = from_dict(TrainConfig, tree)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{source}") from None
    merge_actor_keys(cfg, yaml_keys, cli_keys)
    resolve_defaults(cfg, yaml_keys | cli_keys)
    validate_config(cfg, world_size)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config tree as plain data (dicts, lists, scalars) in field order."""
    return to_dict(cfg)


def format_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML text, for printing at start-up."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, width=100)


def save_resolved(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML to ``path`` atomically (it loads back to an equal config).

    Rank 0 calls it once per run (``<trainer.default_local_dir>/config.yaml``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, format_config(cfg))
