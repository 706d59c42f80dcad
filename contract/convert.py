"""Values checked against a type and converted: a converter built once per type from its hints
(str, int, float, bool, bytes, Scalar, Literal, optional, tuple, dict and dataclasses of them)
takes a decoded value and returns it checked, or raises :class:`ProtocolError` naming the field
path. The wire contract decodes every message through it (:mod:`contract.wire`), and the
contract's order parameters use its errors (:mod:`contract.orders`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Final, Literal, TypeAlias

Scalar: TypeAlias = str | int | float | bool


class ProtocolError(ValueError):
    """The peer sent data that breaks the contract; ``field`` names where (dotted path)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# Each dataclass gets a converter built once from its field types. A converter takes a value and
# returns it checked and converted; on error it raises ProtocolError with the field path relative
# to itself, and each enclosing converter prefixes its own part (no path work on the happy path).

Convert: TypeAlias = Callable[[Any], Any]


def _within(exc: ProtocolError, prefix: str) -> ProtocolError:
    joined = prefix if exc.field == "" else (
        f"{prefix}{exc.field}" if exc.field.startswith("[") else f"{prefix}.{exc.field}"
    )
    return ProtocolError(joined, exc.reason)


# Numbers must fit what every store can hold: 64-bit signed integers, finite floats.
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**63 - 1
OUT_OF_RANGE: Final = "integer out of the 64-bit range"
NOT_FINITE: Final = "expected a finite number"


def _number(value: Any) -> Any:
    if type(value) is int and not INT_MIN <= value <= INT_MAX:
        raise ProtocolError("", OUT_OF_RANGE)
    if type(value) is float and not math.isfinite(value):
        raise ProtocolError("", NOT_FINITE)
    return value


def _scalar(kind: type, name: str) -> Convert:
    def convert(value: Any) -> Any:
        # bool is an int subclass: never accept it where a number is meant.
        if type(value) is kind or (kind is float and type(value) is int):
            return _number(value) if kind in (int, float) else value
        raise ProtocolError("", f"expected {name}, got {type(value).__name__}")

    return convert


def _any_scalar(value: Any) -> Scalar:
    if type(value) in (str, int, float, bool):
        return typing.cast(Scalar, _number(value))
    raise ProtocolError("", f"expected a string, number or boolean, got {type(value).__name__}")


def converter(tp: Any) -> Convert:
    origin = typing.get_origin(tp)
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", bytes: "bytes"}
    if tp in simple:
        return _scalar(tp, simple[tp])
    if tp == Scalar:
        return _any_scalar
    if origin is Literal:
        allowed = typing.get_args(tp)

        def convert_literal(value: Any) -> Any:
            if type(value) is str and value in allowed:
                return value
            raise ProtocolError("", f"expected one of {', '.join(map(repr, allowed))}")

        return convert_literal
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = converter(args[0]) if len(args) == 1 else _any_scalar

        def convert_optional(value: Any) -> Any:
            return None if value is None else inner(value)

        return convert_optional
    if origin is tuple:
        item = converter(typing.get_args(tp)[0])

        def convert_tuple(value: Any) -> tuple[Any, ...]:
            if type(value) is not list:
                raise ProtocolError("", f"expected a list, got {type(value).__name__}")
            out = []
            for i, v in enumerate(value):
                try:
                    out.append(item(v))
                except ProtocolError as exc:
                    raise _within(exc, f"[{i}]") from None
            return tuple(out)

        return convert_tuple
    if origin is dict:
        value_convert = converter(typing.get_args(tp)[1])

        def convert_dict(value: Any) -> dict[str, Any]:
            if type(value) is not dict:
                raise ProtocolError("", f"expected a map, got {type(value).__name__}")
            out = {}
            for k, v in value.items():
                if type(k) is not str:
                    raise ProtocolError("", "map keys must be strings")
                try:
                    out[k] = value_convert(v)
                except ProtocolError as exc:
                    raise _within(exc, k) from None
            return out

        return convert_dict
    if dataclasses.is_dataclass(tp):
        return dataclass_converter(typing.cast(type, tp))
    raise TypeError(f"no wire converter for {tp!r}")


_MISSING: Final = object()


def dataclass_converter(cls: type) -> Convert:
    hints = typing.get_type_hints(cls)
    spec = [
        (
            f.name,
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            converter(hints[f.name]),
        )
        for f in dataclasses.fields(cls)
    ]

    def convert(value: Any) -> Any:
        if type(value) is not dict:
            raise ProtocolError("", f"expected a map, got {type(value).__name__}")
        kwargs = {}
        for name, required, conv in spec:
            v = value.get(name, _MISSING)
            if v is _MISSING:
                if required:
                    raise ProtocolError(name, "missing")
                continue
            try:
                kwargs[name] = conv(v)
            except ProtocolError as exc:
                raise _within(exc, name) from None
        return cls(**kwargs)

    return convert
