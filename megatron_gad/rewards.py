"""Reward functions for the standard (non-GAD) scenarios: user callables named in the config.

A reward function has the verl signature
``fn(data_source: str, solution_str: str, ground_truth, extra_info: dict | None) -> float``.
``custom_reward_function.path`` names a Python file and ``.name`` the function in it. Standard
data needs one (the trainer refuses it without). On GAD data a reward function is optional and
only scores validation (``val/reward``); for the demo task's own data the trainer loads its
built-in exact-match reward (:func:`load_reward_fn` with no path). ``extra_info`` is the row's
``extra_info`` column, as in verl.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from megatron_gad.errors import UserError

RewardFn = Callable[[str, str, Any, "dict | None"], float]


class RewardFunctionError(UserError, ValueError):
    """The configured reward function cannot be loaded or returned a bad value."""


def load_reward_fn(path: str | None, name: str = "compute_score") -> RewardFn:
    """Load ``name`` from the Python file ``path``; the demo's exact-match reward when ``path``
    is empty. Raises RewardFunctionError naming the file and function."""
    if not path:
        from megatron_gad.data.demo import demo_reward

        return demo_reward
    if not os.path.isfile(path):
        raise RewardFunctionError(f"custom_reward_function.path={path!r}: no such file")
    module_name = f"mgad_reward_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses (and pickling) look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file, reported in one line
        del sys.modules[module_name]
        raise RewardFunctionError(f"custom_reward_function.path={path!r} failed to import: {exc!r}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if inspect.isfunction(v)]
        raise RewardFunctionError(
            f"custom_reward_function.name={name!r} is not a function in {path} (functions: {', '.join(found) or 'none'})"
        )
    return fn


def score_responses(
    fn: RewardFn,
    texts: Sequence[str],
    data_sources: Sequence[str | None],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[dict | None] | None = None,
) -> Tensor:
    """Apply ``fn`` to every decoded response; returns float32 ``[N]``. A non-numeric or
    non-finite return raises RewardFunctionError naming the row."""
    out = []
    for i, text in enumerate(texts):
        extra = extra_infos[i] if extra_infos is not None else None
        value = fn(data_sources[i], text, ground_truths[i], extra)
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise RewardFunctionError(f"reward function returned {value!r} for row {i}; expected a number") from exc
        if value != value or value in (float("inf"), float("-inf")):
            raise RewardFunctionError(f"reward function returned {value} for row {i}")
        out.append(value)
    return torch.tensor(out, dtype=torch.float32)
