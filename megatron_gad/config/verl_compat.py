"""verl's launch-script keys: each one is accepted with verl's meaning, or refused in one line that
says what to use instead. Applied by :func:`megatron_gad.config.load_config` to the raw YAML tree
and to the dotted overrides before they are typed, so a verl script runs unchanged where it can.

Three kinds of keys (the README's "verl keys" table lists each one):

* **same**: verl's key is one of ours with the same meaning (``trainer.log_val_generations``,
  ``actor_rollout_ref.model.enable_gradient_checkpointing``, ``*.optim.lr_warmup_steps_ratio``,
  ``actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu``, ...). Nothing happens here.
* **mapped**: verl spells a setting of ours differently or checks something we decide elsewhere;
  the key is rewritten (``actor_rollout_ref.actor.megatron.*`` -> ``actor_rollout_ref.megatron.*``,
  ``trainer.max_{actor,critic}_ckpt_to_keep`` -> ``trainer.max_ckpt_to_keep``,
  ``trainer.resume_from_path`` -> ``trainer.resume_mode``) or checked and consumed
  (``trainer.n_gpus_per_node`` x ``trainer.nnodes`` against the world size, ``trainer.device``,
  ``actor_rollout_ref.ref.megatron.*`` against the actor's layout, greedy ``val_kwargs``).
* **refused**: a verl feature with no counterpart here, when set to anything but the behaviour we
  have (``use_remove_padding=true``, ``reward_model.enable=true``, ...).

Precedence follows the loader: a command-line value beats the YAML file's. A mapped key and its
target both given with different values in one source is refused (no silent pick), and so are
two verl keys mapped onto one of ours with different values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from megatron_gad.config.fields import (
    ConfigError,
    _coerce_bool,
    _coerce_float,
    _coerce_int,
    join_key,
    parse_override,
    set_in,
)

#: verl's key -> ours, same meaning, different place.
RENAMED: dict[str, str] = {
    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size": "actor_rollout_ref.megatron.tensor_model_parallel_size",
    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size": "actor_rollout_ref.megatron.pipeline_model_parallel_size",
    # both roles are saved in one checkpoint directory, so verl's per-role retentions are one setting
    "trainer.max_actor_ckpt_to_keep": "trainer.max_ckpt_to_keep",
    "trainer.max_critic_ckpt_to_keep": "trainer.max_ckpt_to_keep",
}

#: Megatron keys verl has per role that we accept only at the value we run with: key -> (value, why).
_MEGATRON_FIXED: dict[str, tuple[Any, str]] = {
    "context_parallel_size": (1, "context parallelism is not implemented"),
    "expert_model_parallel_size": (1, "the supported models are dense (no experts)"),
    "expert_tensor_parallel_size": (None, "the supported models are dense (no experts)"),
    "virtual_pipeline_model_parallel_size": (None, "virtual pipeline stages are not used"),
    "sequence_parallel": (False, "sequence parallelism is not implemented"),
    "use_distributed_optimizer": (False, "the optimizer state is replicated over data-parallel ranks"),
    "param_offload": (False, "parameter offloading is not implemented"),
    "grad_offload": (False, "gradient offloading is not implemented"),
    "optimizer_offload": (False, "optimizer offloading is not implemented"),
}
_MEGATRON_PREFIXES = ("actor_rollout_ref.actor.megatron", "actor_rollout_ref.ref.megatron", "critic.megatron")
_LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")

#: Keys accepted when set to the value we behave as, refused otherwise: key -> (value, why/what instead).
FIXED: dict[str, tuple[Any, str]] = {
    "actor_rollout_ref.model.use_remove_padding": (
        False, "sequences are trained padded here (packing without padding is the performance work "
               "still open); remove the key or set it to false"),
    "critic.model.use_remove_padding": (
        False, "sequences are trained padded here (packing without padding is the performance work "
               "still open); remove the key or set it to false"),
    "actor_rollout_ref.model.use_fused_kernels": (False, "fused kernels are not used; remove the key"),
    "reward_model.enable": (
        False, "model-based rewards are not supported: GAD's critic is the discriminator, and standard "
               "data takes a reward function (custom_reward_function.path / .name)"),
    "reward_model.reward_manager": (
        "naive", "the reward function is called once per response (verl's naive manager); "
                 "set custom_reward_function.path / .name"),
    "actor_rollout_ref.rollout.val_kwargs.do_sample": (
        False, "validation decodes greedily for its metrics; verl's sampled validation is not supported"),
    "actor_rollout_ref.rollout.val_kwargs.n": (1, "validation decodes one greedy response per prompt"),
    "actor_rollout_ref.rollout.val_kwargs.temperature": (0.0, "validation decodes greedily (temperature 0)"),
    "actor_rollout_ref.rollout.val_kwargs.top_p": (1.0, "validation decodes greedily (no nucleus sampling)"),
    "actor_rollout_ref.rollout.val_kwargs.top_k": (-1, "validation decodes greedily (no top-k sampling)"),
}

#: verl's world-size keys (checked against the run's world size, then dropped).
WORLD_KEYS = ("trainer.n_gpus_per_node", "trainer.nnodes")

#: Keys with no effect here because the behaviour is always the one verl's key asks for.
ALWAYS_ON: dict[str, tuple[bool, str]] = {
    "data.return_raw_chat": (True, "each row keeps its prompt messages (raw_prompt) whatever the value"),
}

_TYPES: dict[type, Callable[[Any, str], Any]] = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float}


def _same(value: Any, expected: Any, key: str) -> bool:
    """``value`` (YAML or command-line text) equals ``expected`` once typed like it."""
    if expected is None:
        return value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~", ""))
    if isinstance(value, str) and not isinstance(expected, str):
        try:
            value = _TYPES[type(expected)](value, key)
        except ConfigError:
            return False
    if isinstance(expected, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) == expected
    return value == expected and type(value) is type(expected)


def _flatten(tree: Any, where: str = "") -> dict[str, Any]:
    """Dotted leaf key -> value of a nested mapping."""
    if not isinstance(tree, dict) or not tree:
        return {where: tree} if where else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, join_key(where, str(key))))
    return out


def _pop(tree: dict[str, Any], key: str) -> None:
    """Remove dotted ``key`` from ``tree`` and any mapping it leaves empty."""
    path = key.split(".")
    nodes = [tree]
    for part in path[:-1]:
        nodes.append(nodes[-1][part])
    del nodes[-1][path[-1]]
    for depth in range(len(path) - 1, 0, -1):
        if nodes[depth] == {}:
            del nodes[depth - 1][path[depth - 1]]


def _get(tree: dict[str, Any], key: str) -> Any:
    """``tree[a][b]...`` for dotted ``key``; None when absent."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _is_verl_key(key: str) -> bool:
    """Whether dotted ``key`` is one of verl's that this module handles (ours pass through)."""
    if key in RENAMED or key in FIXED or key in ALWAYS_ON or key in WORLD_KEYS:
        return True
    if key in ("trainer.resume_from_path", "trainer.device"):
        return True
    if key.startswith("reward_model.") or key.startswith("actor_rollout_ref.rollout.val_kwargs."):
        return True
    return any(key.startswith(p + ".") for p in _MEGATRON_PREFIXES[:2]) or (
        key.startswith("critic.megatron.") and key.rsplit(".", 1)[-1] in _MEGATRON_FIXED)


def _check_fixed(key: str, value: Any, source: str) -> None:
    """Accept a FIXED / per-role Megatron / reward-model key at the value we behave as; else refuse
    it in one line saying why and what is accepted."""
    if key in ALWAYS_ON:
        return
    leaf = key.rsplit(".", 1)[-1]
    if key in FIXED:
        expected, why = FIXED[key]
    elif any(key.startswith(p + ".") for p in _MEGATRON_PREFIXES) and leaf in _MEGATRON_FIXED:
        expected, why = _MEGATRON_FIXED[leaf]
    elif key.startswith("reward_model."):
        expected, why = None, ("reward_model.* configures verl's reward model, which is not supported (GAD's "
                               "critic is the discriminator); set custom_reward_function.path / .name instead")
    elif key.startswith("actor_rollout_ref.rollout.val_kwargs."):
        raise ConfigError(f"{key} (verl) is not supported here ({source}): validation decodes one greedy "
                          "response per prompt; remove the key")
    else:
        raise ConfigError(f"{key} (verl) has no counterpart here ({source}); remove it")
    if not _same(value, expected, key):
        shown = "null" if expected is None else str(expected).lower() if isinstance(expected, bool) else expected
        raise ConfigError(f"{key}={value} (verl) is refused ({source}): {why}"
                          + ("" if expected is None else f" (only {shown} is accepted)"))


def _layout_key(key: str) -> str | None:
    """``tensor_model_parallel_size`` / ``pipeline_model_parallel_size`` of a per-role Megatron key."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf if leaf in _LAYOUT_KEYS and any(key.startswith(p + ".") for p in _MEGATRON_PREFIXES) else None


def translate(tree: dict[str, Any], overrides: Sequence[str], world_size: int) -> tuple[dict[str, Any], list[str]]:
    """Rewrite verl's keys of the YAML ``tree`` and the ``overrides`` into ours (see the module
    docstring); returns the new tree (``tree`` is changed in place) and overrides. ``world_size``
    is the run's (for ``n_gpus_per_node`` x ``nnodes``). Raises ConfigError naming the key."""
    yaml_verl = {k: v for k, v in _flatten(tree).items() if _is_verl_key(k)}
    for key in yaml_verl:
        _pop(tree, key)
    cli_verl: dict[str, Any] = {}
    kept: list[str] = []
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        if _is_verl_key(key):
            cli_verl[key] = value
        else:
            kept.append(text)
    merged = {**yaml_verl, **cli_verl}
    sources = {k: ("on the command line" if k in cli_verl else "in the config file") for k in merged}
    reward_model_off = _same(merged.get("reward_model.enable", False), False, "reward_model.enable")
    for key, value in merged.items():
        if key in RENAMED or _layout_key(key) or key in WORLD_KEYS or key in ("trainer.resume_from_path",
                                                                             "trainer.device"):
            continue
        if reward_model_off and key.startswith("reward_model.") and key not in FIXED:
            continue  # verl reads the reward model's settings only when it is enabled
        _check_fixed(key, value, sources[key])
    _rename(tree, kept, merged, cli_verl)
    kept = _resume_path(tree, kept, merged)
    _check_other_layouts(tree, kept, merged)
    _check_world(merged, world_size)
    _check_device(merged)
    return tree, kept


def _rename(tree: dict[str, Any], kept: list[str], merged: dict[str, Any], cli_verl: dict[str, Any]) -> None:
    """Write each :data:`RENAMED` key of ``merged`` as ours where it was given: a command-line one
    as an override appended to ``kept``, a config-file one into ``tree``. Refused: the verl key and
    ours with different values in one source, and two verl keys of one setting with different
    values (in any source: in verl they are separate settings). A null verl key is unset."""
    renamed: dict[str, tuple[str, Any]] = {}  # our key -> the first verl key given for it, its value
    for key, value in merged.items():
        if key not in RENAMED or _same(value, None, key):
            continue
        target = RENAMED[key]
        first, first_value = renamed.setdefault(target, (key, value))
        if str(first_value).strip() != str(value).strip():
            raise ConfigError(f"{first}={first_value}, {key}={value} differ (verl): here both are {target}; "
                              "set one value")
        if key in cli_verl:
            own = _last_override(kept, target)
            if own is not None and str(own).strip() != str(value).strip():
                raise ConfigError(f"{key}={value} and {target}={own} are both on the command line; set only one "
                                  "(the same setting)")
            kept.append(f"{target}={value}")
        else:
            own = _get(tree, target)
            if own is not None and str(own).strip() != str(value).strip():
                raise ConfigError(f"{key}={value} and {target}={own} are both in the config file; set only one "
                                  "(the same setting)")
            set_in(tree, target.split("."), value)


def _last_override(overrides: Sequence[str], key: str) -> str | None:
    """The value of the last override setting ``key`` (None when none does)."""
    for text in reversed(overrides):
        path, value = parse_override(text)
        if ".".join(path) == key:
            return value
    return None


def _final(tree: dict[str, Any], overrides: list[str], key: str) -> Any:
    """The value ``key`` ends with: the last override setting it, else the YAML tree's."""
    value = _last_override(overrides, key)
    return _get(tree, key) if value is None else value


def _check_other_layouts(tree: dict[str, Any], overrides: list[str], merged: dict[str, Any]) -> None:
    """verl's reference (and critic) Megatron layout must be the actor's: one parallel state is
    shared by every role here."""
    for key, value in merged.items():
        leaf = _layout_key(key)
        if leaf is None or key.startswith("actor_rollout_ref.actor."):
            continue
        actor = _final(tree, overrides, f"actor_rollout_ref.megatron.{leaf}")
        actor_value = 1 if actor is None else actor
        if not _same(value, _coerce_int(actor_value, f"actor_rollout_ref.megatron.{leaf}"), key):
            raise ConfigError(f"{key}={value} (verl) differs from the actor's {leaf}={actor_value}: every role shares "
                              "one Megatron parallel state here; give the same size (or only "
                              f"actor_rollout_ref.megatron.{leaf})")


def _resume_path(tree: dict[str, Any], overrides: list[str], merged: dict[str, Any]) -> list[str]:
    """verl: ``resume_mode=resume_path`` with ``resume_from_path=P`` resumes from P; here that is
    ``resume_mode=P`` (appended as the last override, so it wins). verl ignores the path under
    ``auto`` / ``disable``: that combination is refused rather than silently ignored."""
    mode = _final(tree, overrides, "trainer.resume_mode")
    path = merged.get("trainer.resume_from_path")
    mode_text = None if mode is None else str(mode).strip()
    path_text = None if path is None or str(path).strip() in ("", "null", "None", "~") else str(path).strip()
    if mode_text == "resume_path":
        if path_text is None:
            raise ConfigError("trainer.resume_mode=resume_path (verl) needs trainer.resume_from_path (a "
                              "global_step_<N> directory); here trainer.resume_mode=<path> does both")
        return [*overrides, f"trainer.resume_mode={path_text}"]
    if path_text is not None:
        raise ConfigError(f"trainer.resume_from_path={path_text} (verl) is read only with "
                          f"trainer.resume_mode=resume_path, but resume_mode is {mode_text or 'auto'}; set "
                          "trainer.resume_mode=resume_path (or trainer.resume_mode=<path>), or drop the path")
    return overrides


def _check_world(merged: dict[str, Any], world_size: int) -> None:
    """verl: ``n_gpus_per_node`` x ``nnodes`` processes; here the launcher (or torchrun) decides
    the world size, and the two must agree."""
    given = [k for k in WORLD_KEYS if k in merged]
    if not given:
        return
    gpus = _coerce_int(merged.get("trainer.n_gpus_per_node", 1), "trainer.n_gpus_per_node")
    nodes = _coerce_int(merged.get("trainer.nnodes", 1), "trainer.nnodes")
    if gpus < 1 or nodes < 1:
        raise ConfigError(f"trainer.n_gpus_per_node={gpus} and trainer.nnodes={nodes} must be >= 1")
    if gpus * nodes != world_size:
        raise ConfigError(
            f"trainer.n_gpus_per_node x trainer.nnodes = {gpus} x {nodes} = {gpus * nodes} (verl) but this run has "
            f"{world_size} process(es): launch with --nproc-per-node {gpus} --nnodes {nodes} (or torchrun "
            f"--nproc_per_node {gpus} --nnodes {nodes}), or drop the keys")


def _check_device(merged: dict[str, Any]) -> None:
    """verl's ``trainer.device``: ``cuda`` needs CUDA; ``cpu`` needs its absence (the device
    always follows the machine here)."""
    if "trainer.device" not in merged:
        return
    import torch

    value = str(merged["trainer.device"]).strip().lower()
    have = "cuda" if torch.cuda.is_available() else "cpu"
    if value not in ("cuda", "cpu", "npu"):
        raise ConfigError(f"trainer.device={value} (verl): expected cuda or cpu")
    if value != have:
        raise ConfigError(f"trainer.device={value} (verl) but this machine runs on {have}: the device follows the "
                          "machine here (CUDA when present); remove the key")


def world_from_keys(tree: dict[str, Any], overrides: Sequence[str]) -> tuple[int, int] | None:
    """(``n_gpus_per_node``, ``nnodes``) when the YAML ``tree`` or the overrides set verl's keys
    (the launcher starts that many processes when ``--nproc-per-node`` is not given)."""
    values = {k: _get(tree, k) for k in WORLD_KEYS}
    for text in overrides:
        path, value = parse_override(text)
        if ".".join(path) in WORLD_KEYS:
            values[".".join(path)] = value
    if all(v is None for v in values.values()):
        return None
    gpus = _coerce_int(values["trainer.n_gpus_per_node"] if values["trainer.n_gpus_per_node"] is not None else 1,
                       "trainer.n_gpus_per_node")
    nodes = _coerce_int(values["trainer.nnodes"] if values["trainer.nnodes"] is not None else 1, "trainer.nnodes")
    return gpus, nodes
