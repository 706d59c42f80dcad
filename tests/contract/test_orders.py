"""The parameters of each order action (contract/orders.py): the maps the aggregator sends read
back and written again unchanged, through the wire too; refusals that name the key; unknown
keys ignored; fuzzing of ``from_params``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import orders, wire
from contract.orders import (
    AdoptParams,
    CreateParams,
    DeleteParams,
    EvictParams,
    MigrateParams,
    RebootParams,
    ReceiveParams,
    ReleaseParams,
    StartParams,
    StopParams,
)

SAMPLES = Path(__file__).parents[1] / "data" / "wire"
VM = "5c0f8a5e-2f6b-4a53-9b2e-0d6f6c0f4a11"

# The maps the aggregator sends today, as aggregator/workloads/vms.py and moves.py build them
# (keys in the order they write them).
MIGRATE_KVM: dict[str, wire.Scalar] = {
    "vm_uuid": VM, "dest": "si-b", "mode": "live", "dest_country": "SI",
    "dest_provider": "arnes",
    # What the destination's receive answered (every key a string).
    "address": "10.250.0.2", "domain_type": "kvm",
    "disk": f"/var/lib/virt8ra/disks/{VM}/disk.qcow2", "kernel": "/var/lib/virt8ra/k",
    "initrd": "/var/lib/virt8ra/i", "serial": f"/var/lib/virt8ra/disks/{VM}/serial.log",
    "dest_arch": "x86_64", "dest_machines": "pc-q35-7.2 q35",
    "dest_cpu_models": "EPYC-Milan qemu64",
    # MoveSettings.params(), bandwidth limited.
    "max_downtime_ms": 300, "auto_converge": True, "postcopy": False, "timeout_s": 300.0,
    "bandwidth_mib_s": 100,
}
# A cold move off the test driver: no files, no bandwidth limit, country unknown.
MIGRATE_TEST: dict[str, wire.Scalar] = {
    "vm_uuid": VM, "dest": "si-b", "mode": "cold", "dest_country": "",
    "dest_provider": "", "address": "127.0.0.3", "domain_type": "test", "dest_arch": "i686",
    "dest_machines": "?", "dest_cpu_models": "?",
    "max_downtime_ms": 800, "auto_converge": False, "postcopy": True, "timeout_s": 120.0,
}

SENT: list[tuple[str, dict[str, wire.Scalar], orders.OrderParams]] = [
    ("create", {}, CreateParams()),
    ("start", {"vm_uuid": VM}, StartParams(vm_uuid=VM)),
    ("stop", {"vm_uuid": VM}, StopParams(vm_uuid=VM)),
    ("reboot", {"vm_uuid": VM}, RebootParams(vm_uuid=VM)),
    ("delete", {"vm_uuid": VM}, DeleteParams(vm_uuid=VM)),
    ("receive", {"mode": "live", "source": "si-a"}, ReceiveParams(mode="live", source="si-a")),
    ("migrate", MIGRATE_KVM, MigrateParams(
        vm_uuid=VM, dest="si-b", mode="live", dest_country="SI", dest_provider="arnes",
        address="10.250.0.2", domain_type="kvm", disk=f"/var/lib/virt8ra/disks/{VM}/disk.qcow2",
        kernel="/var/lib/virt8ra/k", initrd="/var/lib/virt8ra/i",
        serial=f"/var/lib/virt8ra/disks/{VM}/serial.log", dest_arch="x86_64",
        dest_machines="pc-q35-7.2 q35", dest_cpu_models="EPYC-Milan qemu64",
        max_downtime_ms=300, auto_converge=True, postcopy=False, timeout_s=300.0,
        bandwidth_mib_s=100)),
    ("migrate", MIGRATE_TEST, MigrateParams(
        vm_uuid=VM, dest="si-b", mode="cold", address="127.0.0.3", domain_type="test",
        dest_arch="i686", dest_machines="?", dest_cpu_models="?", max_downtime_ms=800,
        auto_converge=False, postcopy=True, timeout_s=120.0)),
    ("adopt", {"vm_uuid": VM, "mode": "cold", "start": True},
     AdoptParams(vm_uuid=VM, mode="cold", start=True)),
    ("release", {"vm_uuid": VM}, ReleaseParams(vm_uuid=VM)),
    ("evict", {"vm_uuid": VM}, EvictParams(vm_uuid=VM)),
]
IDS = [f"{action}-{i}" for i, (action, _, _) in enumerate(SENT)]


def test_one_dataclass_per_order_action() -> None:
    assert tuple(orders.PARAMS) == wire.ORDER_ACTIONS
    assert all(action == cls.ACTION for action, cls in orders.PARAMS.items())
    assert {action for action, _, _ in SENT} == set(wire.ORDER_ACTIONS)


@pytest.mark.parametrize(("action", "params", "expected"), SENT, ids=IDS)
def test_what_the_aggregator_sends_reads_back_and_writes_again_unchanged(
        action: str, params: dict[str, wire.Scalar], expected: orders.OrderParams) -> None:
    read = orders.parse_params(action, params)
    assert read == expected
    assert type(read).from_params(params) == expected
    written = read.to_params()
    assert written == params
    assert list(written) == list(params)  # in the order the aggregator writes them


@pytest.mark.parametrize(("action", "params", "expected"), SENT, ids=IDS)
def test_parameters_cross_the_wire_in_a_signed_order(
        action: str, params: dict[str, wire.Scalar], expected: orders.OrderParams) -> None:
    order = wire.Order(node="si-a", seq=7, order_id="ord-7", issued_at=1.0, expires_at=2.0,
                       action=action, params=expected.to_params())
    assert wire.encode(order) == wire.encode(
        wire.Order(node="si-a", seq=7, order_id="ord-7", issued_at=1.0, expires_at=2.0,
                   action=action, params=params))
    back = wire.decode(wire.encode(order))
    assert isinstance(back, wire.Order)
    assert orders.parse_params(back.action, back.params) == expected


def test_the_stored_create_sample_has_no_parameters() -> None:
    sample = wire.decode((SAMPLES / "v1_order_create.msgpack").read_bytes())
    assert isinstance(sample, wire.Order)
    assert orders.parse_params(sample.action, sample.params) == CreateParams()


@pytest.mark.parametrize(("action", "params", "expected"), SENT, ids=IDS)
def test_unknown_keys_are_ignored(action: str, params: dict[str, wire.Scalar],
                                  expected: orders.OrderParams) -> None:
    newer = {**params, "from_a_newer_aggregator": 1, "dest_numa": "0-1"}
    assert orders.parse_params(action, newer) == expected


@pytest.mark.parametrize(("action", "params", "key", "reason"), [
    ("start", {}, "vm_uuid", "missing"),
    ("stop", {"vm_uuid": 7}, "vm_uuid", "expected a string, got int"),
    ("reboot", {"uuid": VM}, "vm_uuid", "missing"),
    ("delete", {"vm_uuid": None}, "vm_uuid", "expected a string, got NoneType"),
    ("receive", {"source": "si-a"}, "mode", "missing"),
    ("receive", {"mode": "live"}, "source", "missing"),
    ("migrate", {**MIGRATE_KVM, "dest": b"si-b"}, "dest", "expected a string, got bytes"),
    ("migrate", {k: v for k, v in MIGRATE_KVM.items() if k != "mode"}, "mode", "missing"),
    ("migrate", {**MIGRATE_KVM, "max_downtime_ms": 300.0}, "max_downtime_ms",
     "expected an integer, got float"),
    ("migrate", {**MIGRATE_KVM, "bandwidth_mib_s": True}, "bandwidth_mib_s",
     "expected an integer, got bool"),
    ("migrate", {**MIGRATE_KVM, "bandwidth_mib_s": 2**63}, "bandwidth_mib_s",
     "integer out of the 64-bit range"),
    ("migrate", {**MIGRATE_KVM, "timeout_s": "300"}, "timeout_s",
     "expected a number, got str"),
    ("migrate", {**MIGRATE_KVM, "timeout_s": float("nan")}, "timeout_s",
     "expected a finite number"),
    ("migrate", {**MIGRATE_KVM, "auto_converge": 1}, "auto_converge",
     "expected a boolean, got int"),
    ("migrate", {**MIGRATE_KVM, "disk": 0}, "disk", "expected a string, got int"),
    ("adopt", {"vm_uuid": VM, "mode": "live", "start": "yes"}, "start",
     "expected a boolean, got str"),
    ("adopt", {"vm_uuid": VM, "mode": "live"}, "start", "missing"),
    ("release", {"vm": VM}, "vm_uuid", "missing"),
    ("evict", {"vm_uuid": ["a"]}, "vm_uuid", "expected a string, got list"),
])
def test_a_missing_or_mistyped_key_is_refused_by_name(
        action: str, params: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(wire.ProtocolError) as caught:
        orders.parse_params(action, params)
    assert (caught.value.field, caught.value.reason) == (key, reason)


def test_a_migrate_takes_what_older_peers_left_out() -> None:
    """What the node has defaults for may be missing (as the agent always took it)."""
    bare = MigrateParams.from_params({"vm_uuid": VM, "dest": "si-b", "mode": "live"})
    assert bare == MigrateParams(vm_uuid=VM, dest="si-b", mode="live")
    assert bare.to_params() == {"vm_uuid": VM, "dest": "si-b", "mode": "live",
                                "dest_country": "", "dest_provider": "",
                                "auto_converge": False, "postcopy": False}


def test_a_number_field_takes_an_integer() -> None:
    read = MigrateParams.from_params({**MIGRATE_KVM, "timeout_s": 90})
    assert read.timeout_s == 90
    assert read.to_params()["timeout_s"] == 90


def test_an_unknown_action_is_refused() -> None:
    with pytest.raises(wire.ProtocolError) as caught:
        orders.parse_params("teleport", {})
    assert caught.value.field == "action"


def test_params_that_are_no_map_are_refused() -> None:
    with pytest.raises(wire.ProtocolError) as caught:
        StartParams.from_params([("vm_uuid", VM)])  # type: ignore[arg-type]
    assert caught.value.field == "params"


def test_the_dataclasses_are_frozen() -> None:
    params = StartParams(vm_uuid=VM)
    with pytest.raises(AttributeError):
        params.vm_uuid = "other"  # type: ignore[misc]


_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                    st.binary(max_size=4), st.lists(st.integers(), max_size=2))
_keys = st.one_of(st.sampled_from(sorted({k for _, p, _ in SENT for k in p} | {"start"})),
                  st.text(max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action=st.sampled_from(wire.ORDER_ACTIONS),
       params=st.dictionaries(_keys, _values, max_size=12))
def test_from_params_reads_anything_or_names_what_is_wrong(
        action: str, params: dict[str, Any]) -> None:
    try:
        read = orders.parse_params(action, params)
    except wire.ProtocolError as exc:
        refused: wire.ProtocolError | None = exc
    else:
        refused = None
        assert orders.parse_params(action, read.to_params()) == read
    if refused is not None:
        assert refused.field in params or refused.reason == "missing"


@pytest.mark.parametrize("made", [
    lambda: StartParams(vm_uuid=7),
    lambda: AdoptParams(vm_uuid=VM, mode="live", start=1),
    lambda: MigrateParams(vm_uuid=VM, dest="si-b", mode="live", timeout_s="300"),
    lambda: MigrateParams(vm_uuid=VM, dest="si-b", mode="live", dest_country=None),
])
def test_parameters_of_the_wrong_type_made_here_are_our_bug(made: Any) -> None:
    with pytest.raises(TypeError):
        made()
