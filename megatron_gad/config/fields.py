"""Generic, typed construction of dataclass trees from YAML values and command-line strings.

Nothing here knows the training sections: every rule is driven by the dataclass fields and their
type hints, so a component's own config dataclass plugs into the tree unchanged. Supported field
types: ``int``, ``float`` (``"1e-6"`` included), ``bool``, ``str``, ``X | None``, ``list[X]``,
``tuple[X, ...]`` / ``tuple[X, Y]``, ``dict[str, X]``, ``Literal[...]``, ``Any`` and nested
dataclasses. A field may also restrict its values with ``field(metadata={"choices": (...)})``.

After a dataclass is built, its ``validate()`` or ``validate(where)`` method (when it has one) is
called; a ``ValueError`` from it becomes a :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from typing import Any, Literal

import yaml

from megatron_gad.errors import UserError

_NONE_STRINGS = ("null", "none", "~")
_TRUE_STRINGS = ("true", "yes", "on", "1")
_FALSE_STRINGS = ("false", "no", "off", "0")


class ConfigError(UserError, ValueError):
    """A user-caused configuration problem; the message names the dotted key and what is valid."""


def join_key(where: str, key: str) -> str:
    """``join_key("a.b", "c") == "a.b.c"``; ``join_key("", "c") == "c"``."""
    return f"{where}.{key}" if where else key


def describe_type(tp: Any) -> str:
    """Short human-readable name of a type hint (``int``, ``list[str]``, ``str | None`` ...)."""
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_union(origin):
        return " | ".join(describe_type(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(describe_type(a) for a in args)}]"
    return str(tp)


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def unknown_key_error(key: str, where: str, valid: list[str], source: str = "") -> ConfigError:
    """The error for a key that does not exist: full dotted key, a close match, the valid keys."""
    full = join_key(where, key)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" (did you mean '{join_key(where, close[0])}'?)" if close else ""
    level = f"'{where}'" if where else "the top level"
    origin = f" in {source}" if source else ""
    return ConfigError(
        f"unknown config key '{full}'{origin}{hint}; valid keys at {level}: {', '.join(sorted(valid))}"
    )


def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of the dataclass ``cls``'s init fields (string annotations included)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def dataclass_in(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (itself, or the X of ``X | None``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(typing.get_origin(tp)):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return dataclass_in(inner[0])
    return None


def _scalar_text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) else None


def _coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = _scalar_text(value)
    if text is not None and text.lower() in _TRUE_STRINGS + _FALSE_STRINGS:
        return text.lower() in _TRUE_STRINGS
    raise ConfigError(f"{where}: expected a boolean (true/false), got {value!r}")


def _coerce_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number: float | None = None
    if isinstance(value, float):
        number = value
    elif (text := _scalar_text(value)) is not None:
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = None
    if number is not None and math.isfinite(number) and number.is_integer():
        return int(number)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _coerce_float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = _scalar_text(value)
    if text is not None:
        try:
            return float(text)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _coerce_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected a string, got {value!r}")


def _as_sequence(value: Any, where: str) -> list[Any]:
    """A YAML list as is; a string as a YAML flow list ``[a, b]`` or a comma list ``a,b``."""
    if isinstance(value, (list, tuple)):
        return list(value)
    text = _scalar_text(value)
    if text is None:
        return [value]
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: cannot parse list {value!r}: {exc}") from None
        return list(parsed)
    return [part.strip() for part in text.split(",") if part.strip()]


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if type(None) in args and (value is None or (_scalar_text(value) or "x").lower() in _NONE_STRINGS):
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # X | None: X's own error is the precise one
        return coerce(value, options[0], where)
    for arg in options:
        try:
            return coerce(value, arg, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: expected {describe_type(tp)}, got {value!r}")


def _coerce_literal(value: Any, tp: Any, where: str) -> Any:
    choices = typing.get_args(tp)
    for choice in choices:
        try:
            if coerce(value, type(choice), where) == choice:
                return choice
        except ConfigError:
            continue
    raise ConfigError(
        f"{where}: invalid value {value!r}; valid choices: {', '.join(str(c) for c in choices)}"
    )


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the type hint ``tp``.

    Raises ConfigError naming ``where`` (the dotted key) and the expected type.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if _is_union(origin):
        return _coerce_union(value, tp, where)
    if origin is Literal:
        return _coerce_literal(value, tp, where)
    if dataclass_in(tp) is not None:
        return from_dict(tp, value, where)
    if value is None:
        raise ConfigError(f"{where}: expected {describe_type(tp)}, got null")
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, where)
    if origin is dict or tp is dict:
        return _coerce_dict(value, tp, where)
    simple = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}
    if tp in simple:
        return simple[tp](value, where)
    raise ConfigError(f"{where}: unsupported field type {describe_type(tp)}")


def _coerce_sequence(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    items = _as_sequence(value, where)
    if origin is list:
        item_tp = args[0] if args else Any
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(items)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items))
    if len(items) != len(args):
        raise ConfigError(f"{where}: expected {len(args)} values ({describe_type(tp)}), got {value!r}")
    return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args)))


def _coerce_dict(value: Any, tp: Any, where: str) -> dict:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: cannot parse mapping {value!r}: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    args = typing.get_args(tp)
    val_tp = args[1] if len(args) == 2 else Any
    return {str(k): coerce(v, val_tp, join_key(where, str(k))) for k, v in value.items()}


def _check_choices(value: Any, field: dataclasses.Field, where: str) -> None:
    choices = field.metadata.get("choices")
    if choices is None or value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if item not in choices:
            raise ConfigError(
                f"{where}: invalid value {item!r}; valid choices: {', '.join(map(str, choices))}"
            )


def run_validate(obj: Any, where: str) -> None:
    """Call ``obj.validate()`` / ``obj.validate(where)`` if defined; ValueError -> ConfigError."""
    validate = getattr(obj, "validate", None)
    if not callable(validate):
        return
    takes_where = len(inspect.signature(validate).parameters) >= 1
    try:
        validate(where or type(obj).__name__) if takes_where else validate()
    except ConfigError:
        raise
    except ValueError as exc:
        message = str(exc)
        prefix = "" if (where and where in message) else f"{where or type(obj).__name__}: "
        raise ConfigError(prefix + message) from None


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively; defaults fill absent keys.

    Unknown keys, wrong types and invalid choices raise ConfigError naming the dotted key.
    """
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys for this section, got {data!r}")
    hints = field_hints(cls)
    for key in data:
        if key not in hints:
            raise unknown_key_error(str(key), where, list(hints))
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        key = join_key(where, name)
        kwargs[name] = coerce(value, hints[name], key)
        _check_choices(kwargs[name], fields[name], key)
    obj = cls(**kwargs)
    run_validate(obj, where)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-safe data (dicts, lists, scalars), in field order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def check_override_path(root: type, path: list[str], source: str) -> None:
    """Verify that the dotted ``path`` names a field of the dataclass tree under ``root``.

    Descends through nested dataclasses; below a ``dict`` field any key is allowed. Raises
    ConfigError with a close-match suggestion for a misspelt key.
    """
    cls: Any = root
    for depth, key in enumerate(path):
        where = ".".join(path[:depth])
        hints = field_hints(cls)
        if key not in hints:
            raise unknown_key_error(key, where, list(hints), source)
        tp = hints[key]
        if depth == len(path) - 1:
            return
        inner = dataclass_in(tp)
        if inner is not None:
            cls = inner
            continue
        if typing.get_origin(tp) is dict or tp is dict or tp is Any:
            return
        raise ConfigError(
            f"{source}: '{join_key(where, key)}' is a {describe_type(tp)} value, not a section "
            f"(it has no key '{path[depth + 1]}')"
        )


def parse_override(text: str) -> tuple[list[str], str]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], "value"); the value stays a string (typed later).

    A leading ``+`` (Hydra's "add key") is accepted and ignored: every valid key already exists.
    """
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("+")
    path = key.split(".")
    if not sep or not key or any(not part for part in path):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    return path, value


def set_in(tree: dict, path: list[str], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating absent (or null) intermediate mappings.

    Raises ConfigError when an intermediate key holds a non-mapping value (e.g. ``data: 3``).
    """
    node = tree
    for depth, key in enumerate(path[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"{where}: expected a mapping of keys for this section, got {child!r}")
        node = child
    node[path[-1]] = value


def flat_keys(tree: Any, where: str = "") -> set[str]:
    """All dotted leaf keys of a nested mapping (a mapping value counts as a section)."""
    if not isinstance(tree, dict):
        return {where}
    keys: set[str] = set()
    for key, value in tree.items():
        keys |= flat_keys(value, join_key(where, str(key)))
    return keys
