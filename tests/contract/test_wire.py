"""The wire contract (contract/wire.py): round-trips, stored byte samples, errors, fuzzing,
topics."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import wire, wirecheck

SAMPLES = Path(__file__).parents[1] / "data" / "wire"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- realistic messages (the stored v1 samples hold exactly these values) --------------------

NODE = "edge-fra-01"
VM_RUNNING = "5c0f8a5e-2f6b-4a53-9b2e-0d6f6c0f4a11"
VM_STOPPED = "9a3d2c41-7e1b-4c6f-8a0d-3b5e7f9c1d22"
ORDER_ID = "ord-20241122-0001"
CSR = (
    "-----BEGIN CERTIFICATE REQUEST-----\nMIIBBjCBrQIBADAWMRQwEgYDVQQDDAtlZGdlLWZyYS0wMQ==\n"
    "-----END CERTIFICATE REQUEST-----\n"
)
CERT = (
    "-----BEGIN CERTIFICATE-----\nMIIB1jCCAXygAwIBAgIUQm9ndXMgc2FtcGxlIGNlcnQ=\n"
    "-----END CERTIFICATE-----\n"
)

INVENTORY = wire.Inventory(
    hostname="edge-fra-01.example.net",
    agent_version="0.1.0",
    domain_type="kvm",
    cpu_model="AMD EPYC 7313P 16-Core Processor",
    cpus=32,
    cpu_mhz=3000,
    sockets=1,
    cores_per_socket=16,
    threads_per_core=2,
    memory_bytes=135_089_577_984,
    libvirt_version="9.0.0",
    hypervisor="QEMU 7.2.0",
    profile="epyc-7313p-128g",
)

HOST = wire.HostSample(
    cpu_percent=12.5,
    cpu_count=32,
    load1=1.25,
    load5=0.75,
    load15=0.5,
    mem_total_bytes=135_089_577_984,
    mem_available_bytes=98_765_432_832,
    mem_used_bytes=33_554_432_000,
    swap_total_bytes=8_589_934_592,
    swap_used_bytes=0,
    uptime_s=864_000.5,
    filesystems=(
        wire.FilesystemSample("/", "ext4", 105_089_261_568, 21_474_836_480, 78_254_321_664),
        wire.FilesystemSample(
            "/var/lib/libvirt/images",
            "xfs",
            3_840_755_982_336,
            1_099_511_627_776,
            2_741_244_354_560,
        ),
    ),
    disks=(
        wire.DiskSample("nvme0n1", 52_428_800_000, 157_286_400_000, 1_234_567, 7_654_321),
        wire.DiskSample("nvme1n1", 10_485_760, 0, 2_560, 0),
    ),
    nics=(
        wire.NicSample(
            "eno1", 987_654_321_000, 123_456_789_000, 901_234_567, 345_678_901, 0, 0, 17, 0
        ),
        wire.NicSample("br0", 4_096, 8_192, 32, 64, 1, 2, 3, 4),
    ),
    temperatures=(
        wire.TemperatureSample("k10temp", "Tctl", 48.0),
        wire.TemperatureSample("nvme", "Composite", 39.85),
    ),
)

GUESTS = (
    wire.GuestSample(
        uuid=VM_RUNNING,
        name="web-01",
        state="running",
        vcpus=4,
        cpu_time_ns=3_600_000_000_000,
        memory_max_bytes=8_589_934_592,
        balloon_current_bytes=8_589_934_592,
        balloon_rss_bytes=4_294_967_296,
        block=(
            wire.GuestBlockSample(
                "vda",
                1_073_741_824,
                2_147_483_648,
                65_536,
                131_072,
                capacity_bytes=53_687_091_200,
                allocation_bytes=12_884_901_888,
            ),
            wire.GuestBlockSample("sda", 512, 0, 1, 0),
        ),
        nics=(wire.GuestNicSample("vnet0", 734_003_200, 209_715_200, 524_288, 262_144),),
    ),
    wire.GuestSample(uuid=VM_STOPPED, name="batch-07", state="shutoff"),
)

EXAMPLES: dict[str, wire.Message] = {
    "status": wire.Status(
        node=NODE, state="online", ts=1_732_243_200.25, interval_s=10.0, inventory=INVENTORY
    ),
    "telemetry": wire.Telemetry(
        node=NODE, seq=4_711, ts=1_732_243_210.5, interval_s=10.0, host=HOST, guests=GUESTS
    ),
    "lifecycle": wire.LifecycleEvent(
        node=NODE,
        seq=4_712,
        ts=1_732_243_211.75,
        vm_uuid=VM_RUNNING,
        vm_name="web-01",
        event="started",
        detail="booted",
        state="running",
    ),
    "telemetry_gap": wire.TelemetryGap(
        node=NODE,
        seq=4_713,
        ts=1_732_243_212.0,
        first_seq=1_001,
        last_seq=1_480,
        reason="spool full",
    ),
    "order": wire.Order(
        node=NODE,
        seq=17,
        order_id=ORDER_ID,
        issued_at=1_732_243_300.0,
        expires_at=1_732_243_360.0,
        action="vm.start",
        params={"vm_uuid": VM_RUNNING, "vcpus": 4, "cpu_weight": 0.5, "autostart": True},
        signature=bytes(range(64)),
    ),
    "report": wire.Report(
        node=NODE,
        seq=4_714,
        ts=1_732_243_301.5,
        order_id=ORDER_ID,
        state="done",
        result={"domain_id": 7, "state": "running", "boot_ms": 812.5, "autostart": True},
        error="",
    ),
    "renew_request": wire.RenewRequest(
        node=NODE, seq=4_716, ts=1_732_243_600.0, csr=CSR, not_after=1_732_502_800.0
    ),
    "certificate": wire.Certificate(
        node=NODE, ts=1_732_243_601.0, certificate=CERT, not_after=1_732_848_401.0
    ),
}

ALL_TYPES = sorted(wire.MESSAGE_TYPES)


def envelope(kind: str) -> dict[str, Any]:
    """The example of ``kind`` as the plain msgpack map a peer sends (a fresh, deep copy)."""
    plain = copy.deepcopy(wire.to_plain(EXAMPLES[kind]))  # to_plain shares dict fields
    return {**plain, "v": wire.PROTOCOL_VERSION, "t": kind}


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


# Every first path segment a ProtocolError from decode may name.
FIELD_ROOTS = {"message", "v", "t"} | {
    f.name for cls in wire.MESSAGE_TYPES.values() for f in dataclasses.fields(cls)
}


def check_decode(data: bytes) -> None:
    """decode returns a message or raises ProtocolError naming a real field; nothing else.
    The ingest's fast check (contract.wirecheck) agrees with it on every input, field included."""
    try:
        wirecheck.check(data)
    except wire.ProtocolError as exc:
        fast_error: str | None = exc.field
    else:
        fast_error = None
    try:
        msg = wire.decode(data)
    except wire.ProtocolError as exc:
        error = exc
    else:
        assert fast_error is None, fast_error
        assert type(msg) is wire.MESSAGE_TYPES[msg.TYPE]
        # Whatever decode accepts, encode writes back stably (byte-equal even with NaN).
        again = wire.encode(msg)
        assert wire.encode(wire.decode(again)) == again
        return
    assert fast_error == error.field, (fast_error, error.field)
    assert error.field.split(".")[0].split("[")[0] in FIELD_ROOTS, error.field


# --- 1. round-trip over every message type ---------------------------------------------------


def test_examples_cover_every_message_type() -> None:
    assert set(EXAMPLES) == set(wire.MESSAGE_TYPES)
    for kind, msg in EXAMPLES.items():
        assert type(msg) is wire.MESSAGE_TYPES[kind]


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_round_trip(kind: str) -> None:
    assert kind in EXAMPLES, f"add an example for new message type {kind!r}"
    msg = EXAMPLES[kind]
    data = wire.encode(msg)
    body = msgpack.unpackb(data, raw=False)
    assert body["v"] == wire.PROTOCOL_VERSION
    assert body["t"] == kind
    decoded = wire.decode(data)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert wire.to_plain(decoded) == wire.to_plain(msg)
    assert wire.CHANNEL_OF[kind] in wire.CHANNELS


def test_round_trip_of_variants() -> None:
    for msg in (
        wire.Status(node="n1", state="offline", ts=0.0),
        wire.TelemetryGap(
            node="n1", seq=9, ts=0.0, first_seq=1, last_seq=8, reason="r", channel="events"
        ),
        wire.Telemetry(
            node="n1",
            seq=0,
            ts=0.0,
            interval_s=0.0,
            host=dataclasses.replace(HOST, filesystems=(), disks=(), nics=(), temperatures=()),
        ),
        wire.Order(node="n1", seq=0, order_id="o", issued_at=0.0, expires_at=0.0, action="a"),
        wire.Report(node="n1", seq=0, ts=0.0, order_id="o", state="failed"),
    ):
        assert wire.decode(wire.encode(msg)) == msg


# --- 2. stored byte samples (what version-1 peers sent) --------------------------------------


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_stored_v1_sample_decodes(kind: str) -> None:
    path = SAMPLES / f"v1_{kind}.msgpack"
    assert path.exists(), f"no stored sample for {kind!r}: add it to make_samples.py"
    assert wire.decode(path.read_bytes()) == EXAMPLES[kind]


def test_stored_minimal_status_fills_defaults() -> None:
    got = wire.decode((SAMPLES / "v1_status_minimal.msgpack").read_bytes())
    assert got == wire.Status(node=NODE, state="offline", ts=1_732_243_400.0)


def test_stored_status_names_the_arch_and_the_lease() -> None:
    got = wire.decode((SAMPLES / "v1_status_arch.msgpack").read_bytes())
    assert isinstance(got, wire.Status)
    assert got.inventory is not None
    assert (got.inventory.arch, got.lease_s) == ("aarch64", 60.0)
    assert got.inventory == dataclasses.replace(EXAMPLES["status"].inventory, arch="aarch64")


def test_stored_gap_names_its_channel() -> None:
    got = wire.decode((SAMPLES / "v1_telemetry_gap_events.msgpack").read_bytes())
    assert got == wire.TelemetryGap(
        node=NODE,
        seq=4_715,
        ts=1_732_243_500.0,
        first_seq=4_600,
        last_seq=4_699,
        reason="spool full",
        channel="events",
    )


def test_stored_sample_from_newer_peer_ignores_unknown_keys() -> None:
    data = (SAMPLES / "v1_telemetry_newer_peer.msgpack").read_bytes()
    body = msgpack.unpackb(data, raw=False)
    assert "power_watts" in body  # the sample does carry extras, at two levels
    assert "psi" in body["host"]
    assert wire.decode(data) == EXAMPLES["telemetry"]


def test_stored_sample_of_unsupported_version_is_rejected() -> None:
    with pytest.raises(wire.ProtocolError) as info:
        wire.decode((SAMPLES / "v2_status.msgpack").read_bytes())
    assert info.value.field == "v"


# --- 3. errors name the field ----------------------------------------------------------------

DELETE = object()


def mutated(kind: str, path: tuple[str | int, ...], value: Any) -> bytes:
    body = envelope(kind)
    target = body
    for part in path[:-1]:
        target = target[part]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return pack(body)


@pytest.mark.parametrize(
    ("kind", "path", "value", "field"),
    [
        ("telemetry", ("host", "cpu_count"), DELETE, "host.cpu_count"),
        ("telemetry", ("host", "nics", 0, "rx_bytes"), "12", "host.nics[0].rx_bytes"),
        ("telemetry", ("host", "nics", 1, "tx_drops"), 1.0, "host.nics[1].tx_drops"),
        ("telemetry", ("host", "filesystems", 0), 5, "host.filesystems[0]"),
        ("telemetry", ("host", "disks"), {}, "host.disks"),
        (
            "telemetry",
            ("host", "temperatures", 1, "celsius"),
            "hot",
            "host.temperatures[1].celsius",
        ),
        ("telemetry", ("host",), [], "host"),
        (
            "telemetry",
            ("guests", 0, "block", 0, "capacity_bytes"),
            1.5,
            "guests[0].block[0].capacity_bytes",
        ),
        ("telemetry", ("guests", 0, "nics", 0, "name"), b"vnet0", "guests[0].nics[0].name"),
        ("telemetry", ("seq",), True, "seq"),
        ("telemetry", ("guests", 1, "vcpus"), False, "guests[1].vcpus"),
        ("telemetry", ("ts",), True, "ts"),
        ("telemetry", ("ts",), "1732243210.5", "ts"),
        ("telemetry", ("node",), DELETE, "node"),
        ("status", ("state",), "sleeping", "state"),
        ("status", ("inventory",), "edge", "inventory"),
        ("status", ("inventory", "cpus"), DELETE, "inventory.cpus"),
        ("order", ("signature",), "00ff", "signature"),
        ("order", ("params", "vcpus"), [4], "params.vcpus"),
        ("order", ("params",), {1: "one"}, "params"),
        ("report", ("result",), [], "result"),
        ("lifecycle", ("vm_uuid",), None, "vm_uuid"),
        ("telemetry_gap", ("last_seq",), DELETE, "last_seq"),
        ("status", ("t",), "heartbeat", "t"),
        ("status", ("t",), DELETE, "t"),
        ("status", ("t",), 1, "t"),
        ("status", ("v",), DELETE, "v"),
        ("status", ("v",), "1", "v"),
        ("status", ("v",), True, "v"),
        ("status", ("v",), 0, "v"),
        ("status", ("node",), "Edge_01", "node"),
        ("status", ("node",), "aggregator", "node"),
        ("status", ("node",), "", "node"),
        ("status", ("node",), 7, "node"),
    ],
)
def test_decode_error_names_field(
    kind: str, path: tuple[str | int, ...], value: Any, field: str
) -> None:
    with pytest.raises(wire.ProtocolError) as info:
        wire.decode(mutated(kind, path, value))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    with pytest.raises(wire.ProtocolError) as fast:
        wirecheck.check(mutated(kind, path, value))
    assert str(fast.value) == str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(pack(envelope("status"))[:-3], id="truncated"),
        pytest.param(pack(envelope("status")) + b"\x00", id="trailing-bytes"),
        pytest.param(b"\x81\x91\x01\x01", id="unhashable-map-key"),
        pytest.param(pack([1, 2]), id="top-level-list"),
        pytest.param(pack("status"), id="top-level-str"),
        pytest.param(pack(None), id="top-level-nil"),
        pytest.param(bytearray(pack(envelope("status"))), id="bytearray"),
        pytest.param(memoryview(pack(envelope("status"))), id="memoryview"),
        pytest.param(b"\x00" * (wire.MAX_PAYLOAD_BYTES + 1), id="oversize-garbage"),
        pytest.param(
            pack({**envelope("status"), "pad": b"x" * wire.MAX_PAYLOAD_BYTES}),
            id="oversize-valid",
        ),
    ],
)
def test_decode_rejects_message_level_garbage(data: Any) -> None:
    with pytest.raises(wire.ProtocolError) as info:
        wire.decode(data)
    assert info.value.field == "message"


def test_oversize_names_the_limit() -> None:
    with pytest.raises(wire.ProtocolError, match=str(wire.MAX_PAYLOAD_BYTES)):
        wire.decode(b"\x00" * (wire.MAX_PAYLOAD_BYTES + 1))


def test_protocol_error_is_a_value_error() -> None:
    exc = wire.ProtocolError("host.cpu_count", "missing")
    assert isinstance(exc, ValueError)
    assert (exc.field, exc.reason, str(exc)) == (
        "host.cpu_count",
        "missing",
        "host.cpu_count: missing",
    )


# --- 4. property-based fuzzing ---------------------------------------------------------------

msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = (
    st.none()
    | st.booleans()
    | msgpack_ints
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
structures = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | msgpack_ints | st.binary(max_size=4), children, max_size=4
        )
    ),
    max_leaves=8,
)
# Cheaper than ``structures`` and as varied in type: what replaces a field in an envelope.
values = (
    scalars
    | st.lists(scalars, max_size=3)
    | st.dictionaries(st.text(max_size=8), scalars, max_size=3)
)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    check_decode(data)


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_bytes_after_a_valid_prefix(tail: bytes) -> None:
    data = pack(envelope("telemetry"))
    check_decode(data[: len(data) // 2] + tail)


@FUZZ
@given(structures)
def test_fuzz_arbitrary_structures(body: Any) -> None:
    check_decode(pack(body))


@FUZZ
@given(
    st.fixed_dictionaries(
        {"v": st.just(1) | values, "t": st.sampled_from(ALL_TYPES) | values},
        optional={"node": st.just(NODE) | values, "seq": values, "ts": values},
    )
)
def test_fuzz_arbitrary_envelopes(body: dict[str, Any]) -> None:
    check_decode(pack(body))


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path into a plain structure (not the root)."""
    found: list[tuple[Any, ...]] = []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        found.append((*prefix, key))
        found.extend(paths(child, (*prefix, key)))
    return found


@FUZZ
@given(st.sampled_from(ALL_TYPES), st.data())
def test_fuzz_valid_envelope_with_fields_replaced(kind: str, data: st.DataObject) -> None:
    body = envelope(kind)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        candidates = paths(body)
        if not candidates:
            break
        path = data.draw(st.sampled_from(candidates), label="path")
        target = body
        for part in path[:-1]:
            target = target[part]
        if data.draw(st.booleans(), label="delete") and isinstance(target, dict):
            del target[path[-1]]
        else:
            target[path[-1]] = data.draw(values, label="value")
    check_decode(pack(body))


# Telemetry from strategies: every field drawn by its declared type.
node_ids = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True).filter(
    lambda n: n not in wire.RESERVED_NODE_IDS
)
# What the contract accepts: 64-bit integers and finite floats (what every store can hold).
wire_ints = st.integers(min_value=wire.INT_MIN, max_value=wire.INT_MAX)
BY_TYPE: dict[Any, st.SearchStrategy[Any]] = {
    int: wire_ints,
    float: st.floats(allow_nan=False, allow_infinity=False),
    str: st.text(max_size=8),
    int | None: st.none() | wire_ints,
}


def sample_of(cls: type[Any], **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``st.builds(cls, ...)`` with a strategy for every field, nested samples included."""
    hints = typing.get_type_hints(cls)
    kwargs = dict(overrides)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) is tuple:
            item = sample_of(typing.get_args(tp)[0])
            kwargs[f.name] = st.lists(item, max_size=2).map(tuple)
        elif dataclasses.is_dataclass(tp):
            kwargs[f.name] = sample_of(typing.cast(type, tp))
        else:
            kwargs[f.name] = BY_TYPE[tp]
    return st.builds(cls, **kwargs)


telemetry = sample_of(wire.Telemetry, node=node_ids)


@settings(FUZZ, max_examples=150)  # each example draws ~100 values: half the budget, same time
@given(telemetry)
def test_telemetry_round_trip_property(msg: wire.Telemetry) -> None:
    assert wire.decode(wire.encode(msg)) == msg


def test_float_fields_accept_integers() -> None:
    body = envelope("telemetry")
    body["ts"] = 1_732_243_210
    body["host"]["temperatures"][0]["celsius"] = 48
    got = wire.decode(pack(body))
    assert isinstance(got, wire.Telemetry)
    assert got.ts == 1_732_243_210
    assert got.host.temperatures[0].celsius == 48


# --- 5. topics -------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", wire.CHANNELS)
def test_topic_round_trip(channel: wire.Channel) -> None:
    name = wire.topic(NODE, channel)
    assert name == f"v8/nodes/{NODE}/{channel}"
    assert wire.parse_topic(name) == (NODE, channel)
    assert wire.subscription(channel) == f"v8/nodes/+/{channel}"


def test_every_message_type_has_a_channel() -> None:
    assert set(wire.CHANNEL_OF) == set(wire.MESSAGE_TYPES)
    assert set(wire.CHANNEL_OF.values()) <= set(wire.CHANNELS)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "v9/nodes/n1/status",
        "v8/node/n1/status",
        "x/v8/nodes/n1/status",
        "/v8/nodes/n1/status",
        "v8/nodes/n1",
        "v8/nodes/n1/status/extra",
        "v8/nodes/n1/status/",
        "v8/nodes/n1/metrics",
        "v8/nodes/n1/Status",
        "v8/nodes/+/status",
        "v8/nodes/#",
        "v8/nodes/n1/#",
        "v8/nodes/n1/+",
        "v8/nodes//status",
        "v8/nodes/N1/status",
        "v8/nodes/-n1/status",
        "v8/nodes/aggregator/status",
        "$SYS/broker/uptime",
    ],
)
def test_parse_topic_rejects(name: str) -> None:
    with pytest.raises(wire.ProtocolError) as info:
        wire.parse_topic(name)
    assert info.value.field in {"topic", "node"}


def test_topic_rejects_unknown_channel() -> None:
    with pytest.raises(TypeError):
        wire.topic(NODE, "metrics")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        wire.subscription("metrics")  # type: ignore[arg-type]


def test_topic_rejects_bad_node() -> None:
    with pytest.raises(wire.ProtocolError) as info:
        wire.topic("Bad/Node", "status")
    assert info.value.field == "node"


@pytest.mark.parametrize("node", ["a", "0", "n1", "edge-fra-01", "a--b", "a" * 63, "aggregator1"])
def test_validate_node_id_accepts(node: str) -> None:
    assert wire.validate_node_id(node) == node


@pytest.mark.parametrize(
    "node",
    [
        "aggregator",
        "Node1",
        "EDGE",
        "",
        "a" * 64,
        "-a",
        "a-",
        "-",
        "a_b",
        "a.b",
        "a b",
        "a/b",
        "+",
        "#",
        "nöde",
        " a",
        None,
        7,
    ],
)
def test_validate_node_id_rejects(node: Any) -> None:
    with pytest.raises(wire.ProtocolError) as info:
        wire.validate_node_id(node)
    assert info.value.field == "node"


# Regressions: an id must match whole (a '$' anchor also matches before a final newline), and
# to_plain must not hand out the message's own mutable fields.


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: wire.validate_node_id("node1\n"), id="validate_node_id"),
        pytest.param(lambda: wire.parse_topic("v8/nodes/node1\n/status"), id="parse_topic"),
        pytest.param(
            lambda: wire.decode(pack({**envelope("status"), "node": "node1\n"})), id="decode"
        ),
    ],
)
def test_node_id_with_trailing_newline_is_rejected(call: typing.Callable[[], Any]) -> None:
    with pytest.raises(wire.ProtocolError):
        call()


def test_to_plain_shares_no_state_with_the_message() -> None:
    msg = wire.decode(pack(envelope("order")))
    assert isinstance(msg, wire.Order)
    wire.to_plain(msg)["params"]["vcpus"] = 64
    assert msg.params["vcpus"] == 4


# --- 6. encode takes only messages -----------------------------------------------------------


class NotAStatus(wire.Status):
    """A subclass is not the registered message type."""


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(object(), id="object"),
        pytest.param(None, id="none"),
        pytest.param(envelope("status"), id="plain-dict"),
        pytest.param(HOST, id="sample"),
        pytest.param(INVENTORY, id="inventory"),
        pytest.param(wire.Status, id="class"),
        pytest.param(NotAStatus(node=NODE, state="online", ts=0.0), id="subclass"),
    ],
)
def test_encode_rejects_non_messages(value: Any) -> None:
    with pytest.raises(TypeError):
        wire.encode(value)


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (("seq",), 2**64 - 1, wire.OUT_OF_RANGE),
        (("seq",), 2**63, wire.OUT_OF_RANGE),  # msgpack carries up to 2**64 - 1
        (("ts",), math.inf, wire.NOT_FINITE),
        (("ts",), math.nan, wire.NOT_FINITE),
        (("host", "cpu_percent"), -math.inf, wire.NOT_FINITE),
        (("host", "mem_total_bytes"), 2**63, wire.OUT_OF_RANGE),
    ],
)
def test_numbers_must_fit_a_store(path: tuple[str, ...], value: Any, reason: str) -> None:
    """A node cannot crash or fool the aggregator's store with numbers it cannot hold."""
    data = mutated("telemetry", path, value)
    for parse in (wire.decode, wirecheck.check):
        with pytest.raises(wire.ProtocolError) as info:
            parse(data)
        assert info.value.field == ".".join(path)
        assert info.value.reason == reason


def test_empty_map_key_names_the_map_in_both_checkers() -> None:
    # Found by the envelope fuzz test: the fast check once named the field "params.".
    body = {**wire.to_plain(EXAMPLES["order"]), "params": {"": None}, "v": 1, "t": "order"}
    data = msgpack.packb(body, use_bin_type=True)
    with pytest.raises(wire.ProtocolError) as slow:
        wire.decode(data)
    with pytest.raises(wire.ProtocolError) as fast:
        wirecheck.check(data)
    assert slow.value.field == fast.value.field == "params"


def test_stored_order_with_a_vm_spec() -> None:
    got = wire.decode((SAMPLES / "v1_order_create.msgpack").read_bytes())
    assert isinstance(got, wire.Order)
    assert got.vm == wire.VmSpec(
        uuid=VM_RUNNING, name="cam-7", vcpus=1, memory_mib=256, disk_gib=1, image="tiny",
        image_sha256="ab" * 32, countries=("SI", "AT"),
    )


def test_signed_bytes_cover_what_was_sent_and_nothing_else() -> None:
    order = wire.Order(node=NODE, seq=3, order_id="o-3", issued_at=1.0, expires_at=2.0,
                       action="start", params={"vm_uuid": VM_RUNNING}, signature=b"x" * 64)
    envelope = wire.order_envelope(order)
    raw = wire.raw_envelope(wire.encode(order))
    assert wire.signed_bytes(raw) == wire.signed_bytes(envelope)
    # The signature itself is not covered; key order does not matter; every other key is.
    assert wire.signed_bytes({**raw, "signature": b""}) == wire.signed_bytes(raw)
    assert wire.signed_bytes(dict(reversed(list(raw.items())))) == wire.signed_bytes(raw)
    assert wire.signed_bytes({**raw, "seq": 4}) != wire.signed_bytes(raw)
    assert wire.signed_bytes({**raw, "added_by_a_newer_peer": 1}) != wire.signed_bytes(raw)
    with pytest.raises(wire.ProtocolError):
        wire.raw_envelope(b"\xc1")
