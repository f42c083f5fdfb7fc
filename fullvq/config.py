"""YAML recipes that map onto dataclasses, with ``key=value`` overrides from the command line.

The same names appear in the YAML file, the overrides (``train.max_steps=100``), the resolved
``config.yaml`` written beside every checkpoint, and the Python API. Unknown keys and values of
the wrong type are errors raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .io import write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe that cannot be used as written; the message names the key and the fix."""


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_value(where: str, value: Any, annotation: Any) -> Any:
    """Coerce ``value`` to ``annotation`` where that is lossless (int -> float, list -> tuple)."""
    if annotation in (Any, inspect.Parameter.empty) or value is None and _allows_none(annotation):
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_value(where, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}={value!r} has the wrong type; expected {_type_name(annotation)}")
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where}={value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        item = args[0] if args else Any
        items = [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of names to values, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if isinstance(value, bool) and annotation is not bool or not isinstance(value, annotation):
            raise ConfigError(f"{where}={value!r} has the wrong type; expected {annotation.__name__}")
        return value
    return value


def _allows_none(annotation: Any) -> bool:
    return annotation is type(None) or type(None) in typing.get_args(annotation)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def build_dataclass(cls: type[T], values: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r}{_suggest(key, fields)}; known keys: {', '.join(fields)}")
        kwargs[key] = _check_value(name, value, hints[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or cls.__name__}: {error}") from None


def check_kwargs(where: str, values: dict, target) -> dict:
    """Check a mapping against the keyword arguments of ``target`` (a class or function)."""
    signature = inspect.signature(target)
    params = {n: p for n, p in signature.parameters.items() if n != "self" and p.kind != p.VAR_KEYWORD}
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    checked = {}
    for key, value in (values or {}).items():
        if key not in params:
            raise ConfigError(f"unknown config key '{where}.{key}'{_suggest(key, params)}; "
                              f"known keys: {', '.join(params)}")
        checked[key] = _check_value(f"{where}.{key}", value, hints.get(key, Any))
    return checked


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.max_steps=100", "model.codebook_size=4096"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key inside {part!r}, which is a value")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read a YAML recipe (or start from the defaults when ``path`` is None), apply overrides, validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for recipes")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}")
    values = merge(values, parse_overrides(overrides or []))
    return build_dataclass(cls, values)


def to_dict(config) -> dict:
    """Plain-YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def dump_config(config, path: str | Path) -> None:
    """Write ``config`` (a dataclass recipe) as YAML, atomically."""
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
