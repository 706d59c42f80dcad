"""A shape defined once: a frozen dataclass whose fields' types (and :class:`Rule` s, through
``typing.Annotated``) say what a JSON value must be. From that one definition come both the
check (:func:`parse`: a value in, the dataclass out, or a :class:`ShapeError` naming the field
and what it must be) and the JSON schema (:func:`schema`, OpenAPI 3.0's dialect), so the
document that describes a request body cannot drift from the code that reads it.

Types understood: ``str``, ``int`` (never a bool), ``float`` (an int too), ``bool``,
``Literal[...]`` of strings, ``X | None``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` and
nested shapes. Keys the shape does not name are ignored. Standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Rule:
    """What a field must be beyond its type. ``must`` replaces the generated "must be ..."
    text; ``code`` the error code a caller reports (default: its own)."""

    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None  # matched whole (Python and ECMA 262 alike)
    max_length: int | None = None
    max_items: int | None = None
    description: str = ""
    must: str = ""
    code: str = ""


class ShapeError(ValueError):
    """``field`` (a dotted path; "" for the value itself) is not what the shape says."""

    def __init__(self, field: str, must: str, code: str = "") -> None:
        super().__init__(f"{field or 'body'} must be {must}")
        self.field, self.must, self.code = field, must, code


Check = Callable[[Any, str], Any]  # (value, its field path) -> the value, or ShapeError
_MISSING = object()


def parse(cls: type[T], value: Any) -> T:
    """``value`` (decoded JSON) as the shape ``cls``; raises :class:`ShapeError`."""
    result: T = _check_of(typing.cast(Any, cls))(value, "")
    return result


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.cache
def _check_of(tp: Any) -> Check:
    base, rule = _split(tp)
    check = _base_check(base)
    if rule is None:
        return check
    return _ruled(check, base, rule)


def _split(tp: Any) -> tuple[Any, Rule | None]:
    if typing.get_origin(tp) is Annotated:
        base, *extra = typing.get_args(tp)
        rules = [r for r in extra if isinstance(r, Rule)]
        return base, rules[0] if rules else None
    return tp, None


def _must(base: Any, rule: Rule | None) -> str:
    """What a value of this type (and rule) must be, in words."""
    if rule is not None and rule.must:
        return rule.must
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(base) if a is not type(None)]
        return f"{_must(inner[0], rule)} or null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(base))
    lo = _number(rule.minimum) if rule and rule.minimum is not None else None
    hi = _number(rule.maximum) if rule and rule.maximum is not None else None
    if base in (int, float):
        what = "an integer" if base is int else "a number"
        if lo is not None and hi is not None:
            return f"{what} from {lo} to {hi}"
        return what + (f" of at least {lo}" if lo is not None else "")
    if base is str:
        return "a string" + (f" of at most {rule.max_length} characters"
                             if rule and rule.max_length else "")
    if base is bool:
        return "true or false"
    if origin is tuple:
        return "a list" + (f" of at most {rule.max_items} items" if rule and rule.max_items
                           else "")
    return "a JSON object"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _base_check(base: Any) -> Check:
    origin = typing.get_origin(base)
    if base is Any:
        return lambda value, path: value
    if dataclasses.is_dataclass(base):
        return _object_check(typing.cast(type, base))
    if origin in (typing.Union, types.UnionType):
        inner = _check_of(next(a for a in typing.get_args(base) if a is not type(None)))

        def check_optional(value: Any, path: str) -> Any:
            if value is None:
                return None
            try:
                return inner(value, path)
            except ShapeError as exc:
                if exc.field == path:  # this value: it may be null too
                    raise ShapeError(path, _must(base, None), exc.code) from None
                raise

        return check_optional
    if origin is tuple:
        item = _check_of(typing.get_args(base)[0])

        def check_list(value: Any, path: str) -> tuple[Any, ...]:
            if type(value) is not list:
                raise ShapeError(path, _must(base, None))
            return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

        return check_list
    if origin is dict:
        item = _check_of(typing.get_args(base)[1])

        def check_map(value: Any, path: str) -> dict[str, Any]:
            if type(value) is not dict:
                raise ShapeError(path, "a JSON object")
            return {k: item(v, _join(path, k)) for k, v in value.items()}

        return check_map
    kinds: dict[Any, tuple[type, ...]] = {str: (str,), int: (int,), float: (int, float),
                                          bool: (bool,)}
    if base in kinds:
        allowed = kinds[base]

        def check_scalar(value: Any, path: str) -> Any:
            if type(value) not in allowed or (
                    type(value) is float and not math.isfinite(value)):
                raise ShapeError(path, _must(base, None))
            return float(value) if base is float else value

        return check_scalar
    if origin is Literal:
        options = typing.get_args(base)

        def check_literal(value: Any, path: str) -> Any:
            if type(value) is not str or value not in options:
                raise ShapeError(path, _must(base, None))
            return value

        return check_literal
    raise TypeError(f"no shape check for {base!r}")


def _ruled(check: Check, base: Any, rule: Rule) -> Check:
    pattern = re.compile(rule.pattern) if rule.pattern else None
    must = _must(base, rule)

    def check_ruled(value: Any, path: str) -> Any:
        try:
            value = check(value, path)
        except ShapeError as exc:
            if exc.field == path:  # this value, not a part of it: say all it must be
                raise ShapeError(path, must, rule.code) from None
            raise
        if value is None:
            return value
        if ((rule.minimum is not None and value < rule.minimum)
                or (rule.maximum is not None and value > rule.maximum)
                or (rule.max_length is not None and len(value) > rule.max_length)
                or (rule.max_items is not None and len(value) > rule.max_items)
                or (pattern is not None and not pattern.fullmatch(value))):
            raise ShapeError(path, must, rule.code)
        return value

    return check_ruled


def _object_check(cls: type) -> Check:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [(f.name, _check_of(hints[f.name]),
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
               _split(hints[f.name]))
              for f in dataclasses.fields(cls)]

    def check_object(value: Any, path: str) -> Any:
        if type(value) is not dict:
            raise ShapeError(path, "a JSON object")
        kwargs = {}
        for name, check, required, (base, rule) in fields:
            raw = value.get(name, _MISSING)
            if raw is _MISSING:
                if required:  # missing: what it must be, as if it were wrong
                    raise ShapeError(_join(path, name), _must(base, rule),
                                     rule.code if rule else "")
                continue
            kwargs[name] = check(raw, _join(path, name))
        return cls(**kwargs)

    return check_object


# --- the JSON schema --------------------------------------------------------------------------


def schema(tp: Any) -> dict[str, Any]:
    """The JSON schema (OpenAPI 3.0) of a shape or a field's type."""
    base, rule = _split(tp)
    out = _base_schema(base)
    if rule is not None:
        extra = {"minimum": rule.minimum, "maximum": rule.maximum,
                 "maxLength": rule.max_length, "maxItems": rule.max_items,
                 "pattern": f"^(?:{rule.pattern})$" if rule.pattern else None,
                 "description": rule.description or None}
        out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _base_schema(base: Any) -> dict[str, Any]:
    origin = typing.get_origin(base)
    if base is Any:
        return {}
    if dataclasses.is_dataclass(base):
        hints = typing.get_type_hints(base, include_extras=True)
        props, required = {}, []
        for f in dataclasses.fields(base):
            props[f.name] = schema(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
            elif f.default is not dataclasses.MISSING and f.default is not None and not (
                    dataclasses.is_dataclass(f.default)):  # a nested shape: its own defaults
                default = f.default
                props[f.name]["default"] = list(default) if isinstance(default, tuple) else (
                    default)
        out: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            out["required"] = required
        return out
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(base) if a is not type(None))
        return {**schema(inner), "nullable": True}
    if origin is tuple:
        return {"type": "array", "items": schema(typing.get_args(base)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema(typing.get_args(base)[1])}
    if origin is Literal:
        return {"type": "string", "enum": list(typing.get_args(base))}
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return {"type": names[base]}
