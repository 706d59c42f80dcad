"""Frozen dataclasses loaded from TOML: the one config loader of both daemons.

A config is a dataclass whose fields are sections (dataclasses themselves) holding scalars,
paths, tuples of strings or mappings of strings. Every value is checked at load; an error names
the file and the key (``ConfigError``) and the daemon stops with it. Defaults live in the
dataclasses; keys the dataclass does not know are errors (a typo must not pass silently).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """A config file is missing, unreadable, or holds a bad key or value."""

    def __init__(self, file: Path | str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")
        self.file = str(file)
        self.key = key
        self.reason = reason


def _check(value: Any, tp: Any, file: Path | str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _check(value, args[0], file, key)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(file, key, "expected a path (non-empty string)")
        return Path(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(file, key, "expected a number")
        if not math.isfinite(value):
            raise ConfigError(file, key, "expected a finite number")
        return float(value)
    if tp in (int, str, bool):
        if type(value) is not tp:
            raise ConfigError(file, key, f"expected {tp.__name__}, got {type(value).__name__}")
        return value
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ConfigError(file, key, "expected a list")
        return tuple(_check(v, item, file, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(file, key, "expected a table")
        item_type = typing.get_args(tp)[1]
        return {str(k): _check(v, item_type, file, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type, tp), value, file, key)
    raise TypeError(f"unsupported config type {tp!r}")


def build(cls: type[T], table: Any, file: Path | str = "<config>", prefix: str = "") -> T:
    """``cls`` from a parsed TOML table; raises :class:`ConfigError` naming file and key."""
    if not isinstance(table, dict):
        raise ConfigError(file, prefix, "expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in table:
        if key not in fields:
            raise ConfigError(file, f"{prefix}.{key}" if prefix else key, "unknown key")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in table:
            kwargs[name] = _check(table[name], hints[name], file, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = build(hints[name], {}, file, key)
            else:
                raise ConfigError(file, key, "missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ validation
        raise ConfigError(file, prefix, str(exc)) from None


def load(cls: type[T], path: Path) -> T:
    """``cls`` from the TOML file at ``path``."""
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except OSError as exc:
        raise ConfigError(path, "", exc.strerror or str(exc)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    return build(cls, table, path)


def dump_toml(table: dict[str, dict[str, Any]]) -> str:
    """A two-level table (sections of scalars, lists of strings) as TOML text."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines: list[str] = []
    for section, entries in table.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {value(v)}" for k, v in entries.items() if v is not None)
        lines.append("")
    return "\n".join(lines)
