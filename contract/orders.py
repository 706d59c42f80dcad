"""What each order action takes: one frozen dataclass per action, for an order's ``params``.

On the wire ``Order.params`` stays a flat map of scalars (``dict[str, Scalar]``, see
:mod:`contract.wire`); this module is its schema, action by action. ``from_params(params)``
reads and checks it: unknown keys are ignored (a newer aggregator may add some), a missing or
mistyped key raises :class:`~contract.wire.ProtocolError` naming the key. ``to_params()`` writes
the map the aggregator sends. A field whose default is ``None`` is one the aggregator sends only
sometimes: left out of the map while it is None. Every other field is always written. A
dataclass made by our own code with a value of the wrong type raises ``TypeError`` (our bug).

The VM spec of ``create`` and ``receive`` travels in ``Order.vm``, not here. Only the standard
library and :mod:`contract.wire` are imported.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self, TypeAlias

from contract.convert import INT_MAX, INT_MIN, NOT_FINITE, OUT_OF_RANGE, ProtocolError, Scalar

# --- reading and writing the map --------------------------------------------------------------

def _wrong(expected: str, value: Any) -> str:
    return f"expected {expected}, got {type(value).__name__}"


def _string(value: Any) -> str | None:
    return None if type(value) is str else _wrong("a string", value)


def _integer(value: Any) -> str | None:
    # bool is an int subclass: never taken where a number is meant.
    if type(value) is not int:
        return _wrong("an integer", value)
    return None if INT_MIN <= value <= INT_MAX else OUT_OF_RANGE


def _number(value: Any) -> str | None:
    if type(value) is int:
        return _integer(value)
    if type(value) is not float:
        return _wrong("a number", value)
    return None if math.isfinite(value) else NOT_FINITE


def _boolean(value: Any) -> str | None:
    return None if type(value) is bool else _wrong("a boolean", value)


# A field's type -> what is wrong with a value for it (None: nothing).
_CHECKS: Final[dict[Any, Callable[[Any], str | None]]] = {
    str: _string, int: _integer, float: _number, bool: _boolean,
}


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    required: bool
    optional: bool  # None is a value of it (left out of the map)
    check: Callable[[Any], str | None]

    def wrong(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this field (None: nothing)."""
        return None if self.optional and value is None else self.check(value)


_FIELDS: Final[dict[type, tuple[_Field, ...]]] = {}


def _fields(cls: type) -> tuple[_Field, ...]:
    """The fields of an action's dataclass, read once from its type hints."""
    known = _FIELDS.get(cls)
    if known is not None:
        return known
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
        if optional:
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(_Field(f.name, required, optional, _CHECKS[tp]))
    _FIELDS[cls] = tuple(out)
    return _FIELDS[cls]


class _Params:
    """The two functions every action's dataclass has."""

    __slots__ = ()
    ACTION: ClassVar[str]

    @classmethod
    def from_params(cls, params: Mapping[str, Scalar]) -> Self:
        """The parameters in an order's ``params``; raises ProtocolError naming the key."""
        if not isinstance(params, Mapping):
            raise ProtocolError("params", f"expected a map, got {type(params).__name__}")
        kwargs: dict[str, Any] = {}
        for f in _fields(cls):
            if f.name not in params:
                if f.required:
                    raise ProtocolError(f.name, "missing")
                continue
            value = params[f.name]
            wrong = f.wrong(value)
            if wrong is not None:
                raise ProtocolError(f.name, wrong)
            kwargs[f.name] = value
        return cls(**kwargs)

    def __post_init__(self) -> None:
        # Made by our own code with a value of the wrong type: our bug, as encode() has it.
        for f in _fields(type(self)):
            wrong = f.wrong(getattr(self, f.name))
            if wrong is not None:
                raise TypeError(f"{type(self).__name__}.{f.name}: {wrong}")

    def to_params(self) -> dict[str, Scalar]:
        """The ``params`` map of an order with these parameters."""
        out: dict[str, Scalar] = {}
        for f in _fields(type(self)):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


# --- one dataclass per action ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateParams(_Params):
    """Define and start the VM of ``Order.vm`` here. The aggregator sends no parameters."""

    ACTION: ClassVar[str] = "create"


@dataclass(frozen=True, slots=True, kw_only=True)
class StartParams(_Params):
    ACTION: ClassVar[str] = "start"
    vm_uuid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StopParams(_Params):
    ACTION: ClassVar[str] = "stop"
    vm_uuid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RebootParams(_Params):
    ACTION: ClassVar[str] = "reboot"
    vm_uuid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteParams(_Params):
    ACTION: ClassVar[str] = "delete"
    vm_uuid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveParams(_Params):
    """The destination of a move checks and prepares for the VM of ``Order.vm``."""

    ACTION: ClassVar[str] = "receive"
    mode: str  # "live" or "cold"
    source: str  # the node the VM comes from


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateParams(_Params):
    """The source of a move sends the VM to ``dest``. The destination's paths, address and
    offers are what its ``receive`` answered (each only if it did); the limits are the move's
    settings (``bandwidth_mib_s`` only when limited). The aggregator sends the destination's
    country and provider and every limit but the bandwidth; the node takes an order without
    them (its own defaults: unknown, QEMU's)."""

    ACTION: ClassVar[str] = "migrate"
    vm_uuid: str
    dest: str
    mode: str  # "live" or "cold"
    dest_country: str = ""  # the destination's, for the VM's residency policy ("": unknown)
    dest_provider: str = ""
    address: str | None = None  # where the destination's libvirtd is reached
    domain_type: str | None = None  # the kind of guests the destination runs
    disk: str | None = None  # the destination's path for each of the VM's files
    kernel: str | None = None
    initrd: str | None = None
    serial: str | None = None
    dest_arch: str | None = None  # what the destination offers guests (HostOffers.as_result)
    dest_machines: str | None = None
    dest_cpu_models: str | None = None
    max_downtime_ms: int | None = None
    auto_converge: bool = False
    postcopy: bool = False
    timeout_s: float | None = None
    bandwidth_mib_s: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AdoptParams(_Params):
    """The destination takes the VM over after it arrived (and boots it if ``start``)."""

    ACTION: ClassVar[str] = "adopt"
    vm_uuid: str
    mode: str  # "live" or "cold"
    start: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseParams(_Params):
    """The destination drops what it prepared for a move that failed (unless the VM came)."""

    ACTION: ClassVar[str] = "release"
    vm_uuid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EvictParams(_Params):
    """A node that was lost and came back removes a VM restarted elsewhere meanwhile."""

    ACTION: ClassVar[str] = "evict"
    vm_uuid: str


OrderParams: TypeAlias = (
    CreateParams | StartParams | StopParams | RebootParams | DeleteParams | ReceiveParams
    | MigrateParams | AdoptParams | ReleaseParams | EvictParams
)
PARAMS: Final[Mapping[str, type[OrderParams]]] = types.MappingProxyType({
    cls.ACTION: cls
    for cls in (CreateParams, StartParams, StopParams, RebootParams, DeleteParams,
                ReceiveParams, MigrateParams, AdoptParams, ReleaseParams, EvictParams)
})


def parse_params(action: str, params: Mapping[str, Scalar]) -> OrderParams:
    """The parameters of an order of ``action``; raises ProtocolError naming the field."""
    cls = PARAMS.get(action)
    if cls is None:
        raise ProtocolError("action", f"unknown action {action!r}")
    return cls.from_params(params)
