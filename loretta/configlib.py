"""Typed dataclass configs from YAML with dotted overrides, collecting every problem at once.

    cfg = load(TrainConfig, "tiny", ["--optim.lr=3e-4", "data.sources.0.weight=2"])

A config source is a recipe name (a YAML shipped in ``loretta/recipes``) or a YAML path. A YAML may
name a ``base`` recipe or file that it extends (deep merge). Values from overrides are parsed
as YAML scalars (``3e-4`` -> float, ``null`` -> None, ``[a, b]`` -> list).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from loretta.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def recipe_names() -> list[str]:
    root = resources.files("loretta") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_source(source: str, _seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """Recipe name or YAML path -> (merged dict, description of where it came from)."""
    if source in _seen:
        raise ConfigError([f"base: {source!r} includes itself ({' -> '.join(_seen)})"])
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(
                [
                    f"--config {source!r}: no such file; pass a YAML path or a recipe name "
                    f"({', '.join(recipe_names())})"
                ]
            )
        text, where = path.read_text(), str(path)
    else:
        res = resources.files("loretta") / "recipes" / f"{source}.yaml"
        if not res.is_file():
            close = difflib.get_close_matches(source, recipe_names(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                [
                    f"--config {source!r}: no recipe of that name and no such file. "
                    f"Recipes: {', '.join(recipe_names())}.{hint}"
                ]
            )
        text, where = res.read_text(), f"recipe {source!r}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{where}: invalid YAML: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{where}: top level must be a mapping, got {type(data).__name__}"])
    base = data.pop("base", None)
    if base is not None:
        base_dict, _ = read_source(str(base), (*_seen, source))
        data = deep_merge(base_dict, data)
    return data, where


def deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[str]:
    """Set dotted keys in `data` in place; returns problems (malformed overrides)."""
    problems = []
    for item in overrides:
        raw = item[2:] if item.startswith("--") else item
        if "=" not in raw:
            problems.append(f"override {item!r}: expected --section.field=value")
            continue
        key, value_text = raw.split("=", 1)
        try:
            value = yaml.safe_load(value_text) if value_text != "" else ""
        except yaml.YAMLError:
            value = value_text
        parts = key.split(".")
        node: Any = data
        ok = True
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"override {item!r}: {'.'.join(parts[:i])} has no item {part}")
                    ok = False
                    break
                node = node[int(part)]
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        if not ok:
            continue
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                problems.append(f"override {item!r}: no list item {last}")
                continue
            node[int(last)] = value
        else:
            node[last] = value
    return problems


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check/convert `value` to type `tp`; append a problem (and return _MISSING) on mismatch."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in inner:
            out = _convert(value, a, where, sub)
            if out is not _MISSING:
                return out
        problems.append(f"{where}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
        return _MISSING
    if origin is Literal:
        if value in get_args(tp):
            return value
        problems.append(f"{where}={value!r}: must be one of {list(get_args(tp))}")
        return _MISSING
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}={value!r}: expected a list")
            return _MISSING
        (item_t,) = get_args(tp) or (Any,)
        items = [_convert(v, item_t, f"{where}.{i}", problems) for i, v in enumerate(value)]
        return _MISSING if any(i is _MISSING for i in items) else items
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{where}={value!r}: expected a mapping")
            return _MISSING
        _, val_t = get_args(tp) or (str, Any)
        out_d = {str(k): _convert(v, val_t, f"{where}.{k}", problems) for k, v in value.items()}
        return _MISSING if any(v is _MISSING for v in out_d.values()) else out_d
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            problems.append(f"{where}={value!r}: expected a mapping of {tp.__name__} fields")
            return _MISSING
        return from_dict(tp, value, where, problems)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}={value!r}: expected true or false")
        return _MISSING
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{where}={value!r}: expected an integer")
        return _MISSING
    if tp is float:
        out_f: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out_f = float(value)
        elif isinstance(value, str):
            try:
                out_f = float(value)  # YAML reads '3e-4' (no dot) as a string
            except ValueError:
                pass
        if out_f is None:
            problems.append(f"{where}={value!r}: expected a number")
            return _MISSING
        if not math.isfinite(out_f):  # .inf / .nan: never a sensible setting here
            problems.append(f"{where}={value!r}: expected a finite number (not inf or nan)")
            return _MISSING
        return out_f
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}={value!r}: expected a string")
        return _MISSING
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str, problems: list[str]) -> T:
    """Build dataclass `cls` from `data`, recording type problems and unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}

    def at(key: str) -> str:
        return f"{where}.{key}" if where else key

    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {at(close[0])}?" if close else ""
            problems.append(f"{at(key)}: unknown field{hint} (known: {', '.join(sorted(fields))})")
            continue
        out = _convert(value, hints[key], at(key), problems)
        if out is not _MISSING:
            kwargs[key] = out
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs and name not in data:
            problems.append(f"{at(name)}: required field is missing")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field was missing or had a bad type
        problems.append(f"{where or 'config'}: {e}")
        return _MISSING  # type: ignore[return-value]


def problem_field(problem: str) -> str:
    """The dotted field a problem message starts with ('optim.lr=...: ...' -> 'optim.lr')."""
    head = problem.split(":", 1)[0]
    return head.split("=", 1)[0].split(" ", 1)[0]


def merge_problems(type_problems: list[str], value_problems: list[str]) -> list[str]:
    """Type problems first, then value problems of fields that had no type problem (a field
    with a bad type holds its default, whose own checks would only mislead)."""
    bad = {problem_field(p) for p in type_problems}
    return type_problems + [
        p
        for p in value_problems
        if not any(problem_field(p) == b or problem_field(p).startswith(b + ".") for b in bad)
    ]


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
