"""YAML recipes that map onto dataclasses, with ``key=value`` overrides from the command line.

The same names appear in the YAML file, the overrides (``train.max_steps=100``), the resolved
``config.yaml`` written beside every checkpoint, and the Python API. Unknown keys and values of
the wrong type are errors raised before any work starts.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .io import write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe that cannot be used as written; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number field may take, written into its type: ``Annotated[int, at_least(1)]``.

    ``hint`` says what the edge values mean (e.g. "0 or null turns clipping off").
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False
    hint: str = ""

    def __contains__(self, value) -> bool:
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return self.high is None or not (value > self.high or self.high_open and value == self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"must lie in {opening}{self.low:g}, {self.high:g}{closing}"
        elif self.low is not None:
            text = f"must be {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"must be {'<' if self.high_open else '<='} {self.high:g}"
        return f"{text} ({self.hint})" if self.hint else text


def at_least(low: float, hint: str = "") -> Range:
    return Range(low=low, hint=hint)


def above(low: float, hint: str = "") -> Range:
    return Range(low=low, low_open=True, hint=hint)


def within(low: float, high: float, *, high_open: bool = False, hint: str = "") -> Range:
    return Range(low=low, high=high, high_open=high_open, hint=hint)


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _WrongType(ConfigError):
    """A value of another type than the field's (a union then tries its next option)."""


def _wrong_type(where: str, value: Any, annotation: Any) -> ConfigError:
    return _WrongType(f"{where}={value!r} has the wrong type; expected {_type_name(annotation)}")


def _check_value(where: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (the field's type, ranges included) and coerced where
    that loses nothing (int -> float, a whole float -> int, list -> tuple); a ConfigError otherwise."""
    if annotation in (Any, inspect.Parameter.empty):
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        value = _check_value(where, value, args[0])
        for bounds in (meta for meta in args[1:] if isinstance(meta, Range)):
            if value is not None and value not in bounds:
                raise ConfigError(f"{where}={value!r} {bounds.describe()}")
        return value
    if annotation is type(None):
        if value is not None:
            raise _wrong_type(where, value, annotation)
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check_value(where, value, option)
            except _WrongType:
                continue  # the type was right but the value was not (out of range, ...): that error stands
        raise _wrong_type(where, value, annotation)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(where, value, annotation)
        items = [a for a in args if a is not Ellipsis]
        item = items[0] if items else Any
        checked = [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _wrong_type(where, value, annotation)
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, where)
    return _check_scalar(where, value, annotation if origin is None else origin)


def _check_scalar(where: str, value: Any, annotation: Any) -> Any:
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value!r} must be a finite number")
        return float(value)
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 5e3 steps
    if isinstance(annotation, type):
        if isinstance(value, bool) and annotation is not bool or not isinstance(value, annotation):
            raise _wrong_type(where, value, annotation)
    return value


def _type_name(annotation: Any) -> str:
    """``int | None`` -> "int or null", ``Annotated[float, ...]`` -> "float"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if annotation is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in args)
    if origin in (tuple, list, collections.abc.Sequence):
        items = [a for a in args if a is not Ellipsis]
        return f"a list of {_type_name(items[0])}" if items else "a list"
    if origin is dict or annotation is dict:
        return "a mapping of names to values"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_fields(instance) -> None:
    """Check (and coerce) every field of a config dataclass against its type and range; its
    ``__post_init__`` calls this, so a config built in Python is held to what a recipe is."""
    hints = typing.get_type_hints(type(instance), include_extras=True)
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        if dataclasses.is_dataclass(value):
            continue  # a section checks itself
        setattr(instance, item.name, _check_value(item.name, value, hints[item.name]))


def build_dataclass(cls: type[T], values: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
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


def build_section(where: str, target, kwargs: dict, errors: tuple[type[BaseException], ...] = (TypeError, ValueError)):
    """``target(**kwargs)`` for the recipe section ``where`` (a model, a loss, a data source); returns
    what it built. An error of the kinds ``errors`` (settings out of range or that do not fit together,
    a missing path) becomes a ``ConfigError`` naming the section, so the command refuses the recipe
    with exit status 2 instead of a traceback."""
    try:
        return target(**kwargs)
    except errors as error:
        raise ConfigError(f"{where}: {error}") from error


def check_kwargs(where: str, values: dict, target) -> dict:
    """Check a mapping against the keyword arguments of ``target`` (a class or function)."""
    signature = inspect.signature(target)
    params = {n: p for n, p in signature.parameters.items() if n != "self" and p.kind != p.VAR_KEYWORD}
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target, include_extras=True)
    checked = {}
    for key, value in (values or {}).items():
        if key not in params:
            raise ConfigError(f"unknown config key '{where}.{key}'{_suggest(key, params)}; "
                              f"known keys: {', '.join(params)}")
        checked[key] = _check_value(f"{where}.{key}", value, hints.get(key, Any))
    return checked


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading the float forms people write (``1e-4``, ``5E3``): YAML 1.1
    wants a dot in them and would read them as strings."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def read_yaml(text: str, source: str):
    """Parse recipe YAML; a syntax error becomes a ConfigError naming ``source``, the line and column."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}; fix it there") from None


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
        node[parts[-1]] = read_yaml(raw, f"override {item!r}") if raw.strip() else None
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
        values = read_yaml(path.read_text(), str(path)) or {}
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


def config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` for every leaf that differs between two config dicts."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append((f"{prefix}{key}", a, b))
    return changes
