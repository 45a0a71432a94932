"""The generic dataclass-tree loader: type coercion from YAML values and command-line strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from megatron_gad.config.fields import ConfigError, check_override_path, coerce, from_dict, to_dict


@dataclass
class Inner:
    size: int = 1
    kind: Literal["a", "b"] = "a"

    def validate(self, where: str) -> None:
        if self.size < 1:
            raise ValueError(f"{where}.size must be >= 1, got {self.size}")


@dataclass
class Outer:
    lr: float = 1e-3
    flag: bool = False
    name: str = "x"
    maybe: int | None = None
    files: list[str] = field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.999)
    extra: dict[str, int] = field(default_factory=dict)
    mode: str = field(default="p", metadata={"choices": ("p", "q")})
    inner: Inner = field(default_factory=Inner)
    optional_inner: Inner | None = None


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        ("3", int, 3), ("1e3", int, 1000), (7, int, 7), (4.0, int, 4),
        ("1e-6", float, 1e-6), (2, float, 2.0), ("0.5", float, 0.5),
        ("false", bool, False), ("True", bool, True), ("1", bool, True), ("off", bool, False), (0, bool, False),
        (12, str, "12"), ("abc", str, "abc"),
        ("null", int | None, None), ("None", int | None, None), (None, int | None, None), ("5", int | None, 5),
        ("[a, b]", list[str], ["a", "b"]), ("a,b", list[str], ["a", "b"]), ("a.parquet", list[str], ["a.parquet"]),
        (["x"], list[str], ["x"]), ("[]", list[str], []), ("", list[str], []),
        ("0.9,0.95", tuple[float, float], (0.9, 0.95)), ([1, 2], tuple[float, float], (1.0, 2.0)),
        ("{a: 1}", dict[str, int], {"a": 1}),
    ],
)
def test_coerce_accepts_yaml_and_cli_forms(value: object, tp: object, expected: object) -> None:
    got = coerce(value, tp, "k")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("value", "tp", "needle"),
    [
        ("abc", int, "expected an integer"), ("1.5", int, "expected an integer"), (True, int, "expected an integer"),
        ("fast", float, "expected a number"), ("maybe", bool, "expected a boolean"), ([1], str, "expected a string"),
        ("1,2,3", tuple[float, float], "expected 2 values"), (None, int, "got null"),
    ],
)
def test_coerce_rejects_with_key_and_type(value: object, tp: object, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        coerce(value, tp, "sec.key")
    assert "sec.key" in str(err.value) and needle in str(err.value)


def test_from_dict_builds_nested_tree_and_keeps_defaults() -> None:
    obj = from_dict(Outer, {"lr": "2e-5", "files": "a,b", "inner": {"size": "4", "kind": "b"},
                            "optional_inner": {"size": 2}})
    assert obj.lr == 2e-5 and obj.files == ["a", "b"] and obj.inner == Inner(4, "b")
    assert obj.optional_inner == Inner(2, "a") and obj.flag is False and obj.betas == (0.9, 0.999)
    assert to_dict(obj)["betas"] == [0.9, 0.999]
    assert from_dict(Outer, to_dict(obj)) == obj


def test_unknown_key_names_full_path_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"sise": 3}}, "root")
    msg = str(err.value)
    assert "'root.inner.sise'" in msg and "did you mean 'root.inner.size'" in msg and "kind, size" in msg


def test_optional_section_keeps_the_precise_error() -> None:
    with pytest.raises(ConfigError, match=r"'optional_inner.sise'.*did you mean 'optional_inner.size'"):
        from_dict(Outer, {"optional_inner": {"sise": 2}})
    with pytest.raises(ConfigError, match=r"maybe: expected an integer, got 'x'"):
        from_dict(Outer, {"maybe": "x"})


def test_choices_literal_and_metadata_list_valid_values() -> None:
    with pytest.raises(ConfigError, match=r"inner.kind: invalid value 'c'; valid choices: a, b"):
        from_dict(Outer, {"inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match=r"^mode: invalid value 'z'; valid choices: p, q"):
        from_dict(Outer, {"mode": "z"})


def test_validate_method_errors_become_config_errors_with_key() -> None:
    with pytest.raises(ConfigError, match=r"inner.size must be >= 1, got 0"):
        from_dict(Outer, {"inner": {"size": 0}})


def test_override_path_checks_sections_and_leaves() -> None:
    check_override_path(Outer, ["inner", "size"], "override")
    check_override_path(Outer, ["extra", "anything"], "override")  # below a dict: free keys
    with pytest.raises(ConfigError, match=r"did you mean 'inner.kind'"):
        check_override_path(Outer, ["inner", "knd"], "override")
    with pytest.raises(ConfigError, match=r"'lr' is a float value, not a section"):
        check_override_path(Outer, ["lr", "x"], "override")
