"""Validate a wire envelope completely without building the message: the ingest hot path.

:func:`check` accepts and refuses exactly what :func:`contract.wire.decode` does, with the same
``ProtocolError`` fields, but builds no dataclasses: the aggregator stores telemetry payloads as
they came and needs only the envelope's number and time. The checks are straight-line Python
generated once per message type from the dataclasses' field types, a few times faster than
the generic converters ``decode`` uses. Imports only the standard library, msgpack and the
wire module.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Final, Literal

import msgpack

from contract import wire

Check = Callable[[Any], None]


class _Source:
    """Python source of the checks for one dataclass and everything nested in it."""

    def __init__(self, parent: _Source | None = None) -> None:
        self.lines: list[str] = []  # the function being written
        # Shared by a whole compilation: finished functions, constants, types done.
        self.functions: list[str] = parent.functions if parent else []
        self.constants: dict[str, Any] = parent.constants if parent else {}
        self.done: set[type] = parent.done if parent else set()

    def const(self, value: Any) -> str:
        name = f"_c{len(self.constants)}"
        self.constants[name] = value
        return name

    def emit(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)


def _fail(field: str, reason: str) -> str:
    return f"raise ProtocolError({field!r}, {reason})"


def _type_reason(expected: str, var: str) -> str:
    return f"'expected {expected}, got ' + type({var}).__name__"


def _map(src: _Source, value_tp: Any, var: str, field: str, indent: int, depth: int) -> None:
    """Emit the checks of a map with string keys and values of ``value_tp``."""
    key, item = f"_k{depth}", f"_v{depth}"
    src.emit(indent, f"if type({var}) is not dict: " + _fail(field, _type_reason("a map", var)))
    src.emit(indent, f"for {key}, {item} in {var}.items():")
    src.emit(indent + 1, f"if type({key}) is not str: "
                         + _fail(field, "'map keys must be strings'"))
    src.emit(indent + 1, "try:")
    _value(src, value_tp, item, "", indent + 2, depth + 1)
    src.emit(indent + 1, "except ProtocolError as _e:")
    # An empty key adds nothing to the path, as in wire.decode.
    src.emit(indent + 2, f"raise _within(_e, {field!r} + '.' + {key} if {key} else {field!r})"
                         " from None")


def _value(src: _Source, tp: Any, var: str, field: str, indent: int, depth: int) -> None:
    """Emit the checks of ``var`` (a value of type ``tp`` at ``field``)."""
    origin = typing.get_origin(tp)
    simple = {str: "string", int: "integer", bool: "boolean", bytes: "bytes"}
    if tp in simple:
        src.emit(indent, f"if type({var}) is not {tp.__name__}: "
                         + _fail(field, _type_reason(simple[tp], var)))
        if tp is int:
            src.emit(indent, f"if not {wire.INT_MIN} <= {var} <= {wire.INT_MAX}: "
                             + _fail(field, repr(wire.OUT_OF_RANGE)))
    elif tp is float:
        src.emit(indent, f"if type({var}) is float:")
        src.emit(indent + 1, f"if not _isfinite({var}): " + _fail(field, repr(wire.NOT_FINITE)))
        src.emit(indent, f"elif type({var}) is int:")
        src.emit(indent + 1, f"if not {wire.INT_MIN} <= {var} <= {wire.INT_MAX}: "
                             + _fail(field, repr(wire.OUT_OF_RANGE)))
        src.emit(indent, "else: " + _fail(field, _type_reason("number", var)))
    elif tp == wire.Scalar:
        src.emit(indent, f"if type({var}) not in _scalars: " + _fail(
            field, f"'expected a string, number or boolean, got ' + type({var}).__name__"))
        src.emit(indent, f"if type({var}) is int and not {wire.INT_MIN} <= {var} <= "
                         f"{wire.INT_MAX}: " + _fail(field, repr(wire.OUT_OF_RANGE)))
        src.emit(indent, f"if type({var}) is float and not _isfinite({var}): "
                         + _fail(field, repr(wire.NOT_FINITE)))
    elif origin is Literal:
        allowed = typing.get_args(tp)
        reason = repr("expected one of " + ", ".join(map(repr, allowed)))
        src.emit(indent, f"if type({var}) is not str or {var} not in {src.const(allowed)}: "
                         + _fail(field, reason))
    elif origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        src.emit(indent, f"if {var} is not None:")
        if len(args) == 1:
            _value(src, args[0], var, field, indent + 1, depth)
        else:
            _value(src, wire.Scalar, var, field, indent + 1, depth)
    elif origin is tuple:
        item, i = f"_v{depth}", f"_i{depth}"
        src.emit(indent, f"if type({var}) is not list: "
                         + _fail(field, _type_reason("a list", var)))
        src.emit(indent, f"for {i}, {item} in enumerate({var}):")
        _item(src, typing.get_args(tp)[0], item, field, i, indent + 1, depth + 1)
    elif origin is dict:
        _map(src, typing.get_args(tp)[1], var, field, indent, depth)
    elif dataclasses.is_dataclass(tp):
        src.emit(indent, "try:")
        src.emit(indent + 1, f"{_dataclass(src, typing.cast(type, tp))}({var})")
        src.emit(indent, "except ProtocolError as _e:")
        src.emit(indent + 1, f"raise _within(_e, {field!r}) from None")
    else:
        raise TypeError(f"no wire check for {tp!r}")


def _item(src: _Source, tp: Any, var: str, field: str, index: str, indent: int,
          depth: int) -> None:
    src.emit(indent, "try:")
    _value(src, tp, var, "", indent + 1, depth)
    src.emit(indent, "except ProtocolError as _e:")
    src.emit(indent + 1, f"raise _within(_e, {field!r} + '[' + str({index}) + ']') from None")


def _dataclass(src: _Source, cls: type) -> str:
    """Emit ``_check_<cls>`` (once) and return its name."""
    name = f"_check_{cls.__name__}"
    if cls in src.done:
        return name
    src.done.add(cls)
    hints = typing.get_type_hints(cls)
    body = _Source(src)
    body.emit(0, f"def {name}(value):")
    body.emit(1, "if type(value) is not dict: "
                 + _fail("", "'expected a map, got ' + type(value).__name__"))
    body.emit(1, "get = value.get")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        body.emit(1, f"x = get({f.name!r}, _missing)")
        if required:
            body.emit(1, "if x is _missing: " + _fail(f.name, "'missing'"))
            _value(body, hints[f.name], "x", f.name, 1, 0)
        else:
            body.emit(1, "if x is not _missing:")
            _value(body, hints[f.name], "x", f.name, 2, 0)
    src.functions.append("\n".join(body.lines))
    return name


def _within(exc: wire.ProtocolError, prefix: str) -> wire.ProtocolError:
    if not exc.field:
        return wire.ProtocolError(prefix, exc.reason)
    if not prefix:
        return exc
    joiner = "" if exc.field.startswith("[") else "."
    return wire.ProtocolError(f"{prefix}{joiner}{exc.field}", exc.reason)


def _compile(cls: type) -> Check:
    src = _Source()
    entry = _dataclass(src, cls)
    namespace: dict[str, Any] = {
        "ProtocolError": wire.ProtocolError,
        "_within": _within,
        "_missing": object(),
        "_scalars": (str, int, float, bool),
        "_isfinite": math.isfinite,
        **src.constants,
    }
    code = compile("\n\n".join(src.functions), f"<wire check of {cls.__name__}>", "exec")
    exec(code, namespace)  # noqa: S102 - source generated above from our own dataclasses
    check: Check = namespace[entry]
    return check


_CHECKS: Final[dict[str, Check]] = {
    name: _compile(cls) for name, cls in wire.MESSAGE_TYPES.items()
}


def check(data: bytes) -> tuple[str, dict[str, Any]]:
    """``(type, body)`` of a valid envelope; raises ``wire.ProtocolError`` for anything else."""
    if type(data) is not bytes:
        raise wire.ProtocolError("message", "expected bytes")
    if len(data) > wire.MAX_PAYLOAD_BYTES:
        raise wire.ProtocolError("message", f"larger than {wire.MAX_PAYLOAD_BYTES} bytes")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise wire.ProtocolError("message", f"not msgpack: {exc.__class__.__name__}") from None
    if type(body) is not dict:
        raise wire.ProtocolError("message", f"expected a map, got {type(body).__name__}")
    version = body.get("v")
    if type(version) is not int:
        raise wire.ProtocolError("v", "missing or not an integer")
    if version not in wire.SUPPORTED_VERSIONS:
        raise wire.ProtocolError("v", f"unsupported protocol version {version}")
    kind = body.get("t")
    checker = _CHECKS.get(kind) if type(kind) is str else None
    if checker is None:
        raise wire.ProtocolError("t", f"unknown message type {kind!r}")
    try:
        checker(body)
    except wire.ProtocolError as exc:
        raise wire.ProtocolError(exc.field or "message", exc.reason) from None
    wire.validate_node_id(body["node"])
    return typing.cast(str, kind), body
