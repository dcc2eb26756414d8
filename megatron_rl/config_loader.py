"""Build typed, frozen dataclass trees from YAML and dotted `key=value` overrides, failing with the dotted key.

    cfg = load_typed(TrainConfig, yaml_text_or_dict, ["actor.layout.tp=2", "algorithm.lspo.enabled=false"])

- Unknown keys are errors that name the key and suggest the closest known one.
- A settings dataclass checks its own values in __post_init__ and raises `FieldError(field, problem)` naming the
  field relative to itself; `from_dict` reports it under the field's full dotted key in the tree
  ("actor.loss.clip_low: must be in [0, 1) ..."), wherever the dataclass is embedded.
- Values are checked against the field's annotation: int, float (ints accepted), bool, str, None/Optional,
  Literal, list/tuple, dict/Mapping, nested dataclasses; a dataclass's own __post_init__ checks run too, and
  their messages are prefixed with the dotted path of the section.
- Override values are parsed as YAML scalars/lists (`a.b=3`, `a.c=[1,2]`, `a.d=null`, `a.e=true`).
Generic: it knows nothing about RL; any frozen dataclass tree works.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

from megatron_rl.errors import FieldError, is_finite_number, require  # noqa: F401 - part of this API


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key."""


def parse_overrides(overrides: Sequence[str]) -> dict:
    """["a.b=1", "a.c=x"] -> {"a": {"b": 1, "c": "x"}} (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
        set_dotted(tree, key, value)
    return tree


def set_dotted(tree: dict, dotted: str, value, *, overwrite: bool = True) -> None:
    """tree["a"]["b"]["c"] = value for dotted "a.b.c", creating sections; overwrite=False keeps an existing value."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is given both as a value and as a section")
    if overwrite:
        node[parts[-1]] = value
    else:
        node.setdefault(parts[-1], value)


def deep_merge(base: Mapping, update: Mapping) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def from_dict(cls, data: Any, path: str = ""):
    """An instance of dataclass `cls` from a mapping, recursively validated (see module docstring)."""
    where = path or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a section (mapping), got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{_join(path, close[0])}'?)" if close else f"; known keys: {', '.join(sorted(fields))}"
        raise ConfigError(f"{_join(path, key)}: unknown key{hint}")
    kwargs = {name: coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as e:
        raise ConfigError(f"{_join(path, e.field)}: {e.problem}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(tp, value: Any, path: str):
    """Check/convert `value` against annotation `tp`; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if value is None:
        raise ConfigError(f"{path}: must not be null (expected {_type_name(tp)})")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        if not math.isfinite(value):  # NaN compares False with every bound: it would slip through range checks
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
        return value
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: must be a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [coerce(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): coerce(value_type, v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: unsupported value {value!r} for type {_type_name(tp)}")


def to_dict(obj) -> Any:
    """Plain YAML-able data of a dataclass tree (tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)
