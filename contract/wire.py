"""The wire contract between agents and the aggregator: data plus two functions.

Every MQTT payload is a msgpack map, the *envelope*: ``v`` (protocol version), ``t`` (message
type) and the fields of one frozen dataclass below. ``encode(msg) -> bytes`` and
``decode(data) -> Message`` are the only ways in and out. Unknown keys are ignored (a newer
peer may add fields); a missing or mistyped key raises :class:`ProtocolError` naming the field.
Topic strings come only from the functions at the end of this module.

Errors::

    ProtocolError (ValueError)   the peer sent something this contract does not accept

Encoding a message of ours that is malformed is our own bug and raises ``TypeError``.
This module imports only the standard library and msgpack.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import msgpack

from contract.convert import INT_MAX as INT_MAX
from contract.convert import INT_MIN as INT_MIN
from contract.convert import NOT_FINITE as NOT_FINITE
from contract.convert import OUT_OF_RANGE as OUT_OF_RANGE
from contract.convert import Convert, dataclass_converter
from contract.convert import ProtocolError as ProtocolError
from contract.convert import Scalar as Scalar

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})
TOPIC_PREFIX: Final = "v8/nodes"
NODE_ID_PATTERN: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
RESERVED_NODE_IDS: Final = frozenset({"aggregator", "aggregator-control"})  # our own CNs
MAX_PAYLOAD_BYTES: Final = 1 << 20

def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` if it can name a node (a DNS label, not reserved), else raise."""
    if not isinstance(node_id, str) or not NODE_ID_PATTERN.fullmatch(node_id):
        raise ProtocolError("node", f"{node_id!r} is not a node id (lower-case DNS label)")
    if node_id in RESERVED_NODE_IDS:
        raise ProtocolError("node", f"{node_id!r} is reserved")
    return node_id


# --- samples (parts of messages) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilesystemSample:
    mountpoint: str
    fstype: str
    total_bytes: int
    used_bytes: int
    free_bytes: int


@dataclass(frozen=True, slots=True)
class DiskSample:
    name: str
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int


@dataclass(frozen=True, slots=True)
class NicSample:
    name: str
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    rx_errors: int
    tx_errors: int
    rx_drops: int
    tx_drops: int


@dataclass(frozen=True, slots=True)
class TemperatureSample:
    sensor: str
    label: str
    celsius: float


@dataclass(frozen=True, slots=True)
class HostSample:
    cpu_percent: float
    cpu_count: int
    load1: float
    load5: float
    load15: float
    mem_total_bytes: int
    mem_available_bytes: int
    mem_used_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    uptime_s: float
    filesystems: tuple[FilesystemSample, ...] = ()
    disks: tuple[DiskSample, ...] = ()
    nics: tuple[NicSample, ...] = ()
    temperatures: tuple[TemperatureSample, ...] = ()


@dataclass(frozen=True, slots=True)
class GuestBlockSample:
    name: str
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int
    capacity_bytes: int | None = None
    allocation_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class GuestNicSample:
    name: str
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


@dataclass(frozen=True, slots=True)
class GuestSample:
    uuid: str
    name: str
    state: str
    vcpus: int | None = None
    cpu_time_ns: int | None = None
    memory_max_bytes: int | None = None
    balloon_current_bytes: int | None = None
    balloon_rss_bytes: int | None = None
    block: tuple[GuestBlockSample, ...] = ()
    nics: tuple[GuestNicSample, ...] = ()


@dataclass(frozen=True, slots=True)
class Inventory:
    """What a node is: reported on every connect inside its status."""

    hostname: str
    agent_version: str
    domain_type: str
    cpu_model: str
    cpus: int
    cpu_mhz: int
    sockets: int
    cores_per_socket: int
    threads_per_core: int
    memory_bytes: int
    libvirt_version: str
    hypervisor: str
    profile: str = ""
    arch: str = ""  # the host's own, as libvirt names it (x86_64, aarch64); "": not told


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """Retained on ``.../status``; ``offline`` is also the node's last will."""

    TYPE: typing.ClassVar[str] = "status"
    node: str
    state: Literal["online", "offline"]
    ts: float
    interval_s: float = 0.0
    inventory: Inventory | None = None
    # The node pauses its guests after this long cut off from the aggregator (0: never);
    # the aggregator restarts them elsewhere only after it, plus a grace period.
    lease_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Telemetry:
    TYPE: typing.ClassVar[str] = "telemetry"
    node: str
    seq: int
    ts: float
    interval_s: float
    host: HostSample
    guests: tuple[GuestSample, ...] = ()


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A libvirt domain lifecycle event as it happened on the node."""

    TYPE: typing.ClassVar[str] = "lifecycle"
    node: str
    seq: int
    ts: float
    vm_uuid: str
    vm_name: str
    event: str
    detail: str
    state: str


@dataclass(frozen=True, slots=True)
class TelemetryGap:
    """The node's spool overflowed: messages ``first_seq..last_seq`` of ``channel``
    (``telemetry`` or ``events``) are gone for good."""

    TYPE: typing.ClassVar[str] = "telemetry_gap"
    node: str
    seq: int
    ts: float
    first_seq: int
    last_seq: int
    reason: str
    channel: str = "telemetry"


@dataclass(frozen=True, slots=True)
class VmSpec:
    """A guest as the aggregator orders it; the node builds its libvirt XML from this typed
    spec (never from text) and fetches the images it names, checking their sha256."""

    uuid: str
    name: str
    vcpus: int
    memory_mib: int
    disk_gib: int = 0
    image: str = ""  # a disk image to boot from (copied into the VM's disk), or ""
    image_sha256: str = ""
    kernel: str = ""  # direct kernel boot, for small appliances
    kernel_sha256: str = ""
    initrd: str = ""
    initrd_sha256: str = ""
    cmdline: str = ""
    # The VM's residency policy: the node refuses the VM if its own certificate's country or
    # provider is not allowed (empty: any).
    countries: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()


ORDER_ACTIONS: Final = (
    "create", "start", "stop", "reboot", "delete",
    # Moving a VM between nodes: the destination checks and prepares (``receive``), the
    # source moves it there (``migrate``), the destination takes it over (``adopt``) or
    # drops what it prepared after a failed move (``release``). ``evict``: a node that was
    # lost and came back removes a VM that was restarted elsewhere meanwhile.
    "receive", "migrate", "adopt", "release", "evict",
)


@dataclass(frozen=True, slots=True)
class Order:
    """A signed instruction to one node. ``signature`` is Ed25519 by the aggregator's
    order-signing key over :func:`signed_bytes` of the envelope as sent."""

    TYPE: typing.ClassVar[str] = "order"
    node: str
    seq: int
    order_id: str
    issued_at: float
    expires_at: float
    action: str
    params: dict[str, Scalar] = field(default_factory=dict)
    signature: bytes = b""
    vm: VmSpec | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """A node's account of an order: ``accepted`` (journaled), then ``succeeded`` or
    ``failed``; ``refused`` when it will not run it (bad signature, replay, expired, limits).
    ``progress`` reports come while a long order (a migration) runs: figures so far."""

    TYPE: typing.ClassVar[str] = "report"
    node: str
    seq: int
    ts: float
    order_id: str
    state: str
    result: dict[str, Scalar] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True)
class RenewRequest:
    """The node asks for a new certificate before its own expires: a PEM CSR for a key it made.
    Sent on the node's events channel, so only the node itself can send it (mTLS + ACL)."""

    TYPE: typing.ClassVar[str] = "renew_request"
    node: str
    seq: int
    ts: float
    csr: str
    not_after: float  # when the node's current certificate expires


@dataclass(frozen=True, slots=True)
class Certificate:
    """The aggregator's answer to a :class:`RenewRequest`, on the node's orders topic. Needs no
    order signature: the node accepts it only if the fleet CA signed it for the node's new key."""

    TYPE: typing.ClassVar[str] = "certificate"
    node: str
    ts: float
    certificate: str
    not_after: float


Message: TypeAlias = (
    Status | Telemetry | LifecycleEvent | TelemetryGap | Order | Report | RenewRequest
    | Certificate
)
MESSAGE_TYPES: Final[dict[str, type[Any]]] = {
    cls.TYPE: cls
    for cls in (Status, Telemetry, LifecycleEvent, TelemetryGap, Order, Report, RenewRequest,
                Certificate)
}


# --- encode ---------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def to_plain(msg: Any) -> dict[str, Any]:
    """A message or sample as plain dicts and lists (for JSON or storage)."""
    plain = _to_plain(msg)
    assert isinstance(plain, dict)
    return plain


def encode(msg: Message) -> bytes:
    """The envelope for ``msg`` as msgpack bytes."""
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TYPE", "")) is not cls:
        raise TypeError(f"not a wire message: {cls.__name__}")
    body = _to_plain(msg)
    try:  # what we send must be what every peer accepts
        _DECODERS[cls.TYPE](body)
        validate_node_id(msg.node)
    except ProtocolError as exc:
        raise TypeError(f"malformed {cls.TYPE} message: {exc}") from None
    body["v"] = PROTOCOL_VERSION
    body["t"] = cls.TYPE
    try:
        return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]
    except OverflowError as exc:
        raise TypeError(f"malformed {cls.TYPE} message: {exc}") from None


# --- decode ---------------------------------------------------------------------------------

_DECODERS: Final[dict[str, Convert]] = {
    name: dataclass_converter(cls) for name, cls in MESSAGE_TYPES.items()
}


def decode(data: bytes) -> Message:
    """The message in ``data``; raises :class:`ProtocolError` for anything else."""
    if type(data) is not bytes:
        raise ProtocolError("message", "expected bytes")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("message", f"larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError("message", f"not msgpack: {exc.__class__.__name__}") from None
    if type(body) is not dict:
        raise ProtocolError("message", f"expected a map, got {type(body).__name__}")
    version = body.get("v")
    if type(version) is not int:
        raise ProtocolError("v", "missing or not an integer")
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError("v", f"unsupported protocol version {version}")
    kind = body.get("t")
    decoder = _DECODERS.get(kind) if type(kind) is str else None
    if decoder is None:
        raise ProtocolError("t", f"unknown message type {kind!r}")
    try:
        msg: Message = decoder(body)
    except ProtocolError as exc:
        raise ProtocolError(exc.field or "message", exc.reason) from None
    validate_node_id(msg.node)
    return msg


# --- order signatures -----------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def signed_bytes(envelope: dict[str, Any]) -> bytes:
    """What an order's signature covers: the envelope as sent (every key, including any this
    version does not know), without ``signature``, map keys sorted, packed with msgpack."""
    body = {k: v for k, v in envelope.items() if k != "signature"}
    packed: bytes = msgpack.packb(_canonical(body), use_bin_type=True)
    return b"virt8ra-order\x00" + packed


def order_envelope(order: Order) -> dict[str, Any]:
    """The map :func:`encode` sends for ``order`` (for signing before sending)."""
    body = _to_plain(order)
    body["v"] = PROTOCOL_VERSION
    body["t"] = Order.TYPE
    return typing.cast(dict[str, Any], body)


def raw_envelope(data: bytes) -> dict[str, Any]:
    """The map in ``data`` as received; raises ProtocolError. For checking a signature over
    exactly what was sent."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError("message", f"not msgpack: {exc.__class__.__name__}") from None
    if type(body) is not dict:
        raise ProtocolError("message", "expected a map")
    return typing.cast(dict[str, Any], body)


# --- topics ---------------------------------------------------------------------------------

Channel: TypeAlias = Literal["status", "telemetry", "events", "orders"]
CHANNELS: Final[tuple[Channel, ...]] = ("status", "telemetry", "events", "orders")


def topic(node: str, channel: Channel) -> str:
    """The topic of ``channel`` for ``node``."""
    if channel not in CHANNELS:
        raise TypeError(f"unknown channel {channel!r}")
    return f"{TOPIC_PREFIX}/{validate_node_id(node)}/{channel}"


def subscription(channel: Channel) -> str:
    """The wildcard that matches ``channel`` of every node."""
    if channel not in CHANNELS:
        raise TypeError(f"unknown channel {channel!r}")
    return f"{TOPIC_PREFIX}/+/{channel}"


def parse_topic(name: str) -> tuple[str, Channel]:
    """``(node, channel)`` of a topic; raises :class:`ProtocolError` for a foreign topic."""
    parts = name.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != TOPIC_PREFIX or parts[3] not in CHANNELS:
        raise ProtocolError("topic", f"{name!r} is not a virt8ra node topic")
    return validate_node_id(parts[2]), parts[3]


CHANNEL_OF: Final[dict[str, Channel]] = {
    Status.TYPE: "status",
    Telemetry.TYPE: "telemetry",
    LifecycleEvent.TYPE: "events",
    TelemetryGap.TYPE: "events",
    Report.TYPE: "events",
    RenewRequest.TYPE: "events",
    Order.TYPE: "orders",
    Certificate.TYPE: "orders",
}
