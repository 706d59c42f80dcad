"""The source's reading of a migrate order (agent/orders/migrate.py), without libvirt: the
guest's files by role, whether its disk has a backing file, the limits for QEMU, and the
destination's migration URI. (The same checks in tests/aggregator/workloads/test_moves_unit.py
go through agent.orders.runner's old names; these are their home.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.host.domainxml import domain_xml
from agent.orders import migrate
from agent.orders.errors import Refused
from agent.orders.settings import Migration
from contract.orders import MigrateParams
from contract.wire import VmSpec

UUID = "6f1c1f0e-8a5b-4c1e-9a57-3b6a2d0f9c11"
DISK, KERNEL, INITRD, SERIAL = ("/var/lib/virt8ra/vms/web-1/disk.qcow2", "/var/lib/virt8ra/k",
                                "/var/lib/virt8ra/i", "/var/lib/virt8ra/vms/web-1/serial.log")
DATA = Path(__file__).parents[2] / "data"
SPEC = VmSpec(uuid=UUID, name="web-1", vcpus=2, memory_mib=256)


def test_files_of_a_guest_by_role() -> None:
    xml = domain_xml(SPEC, domain_type="kvm", disk=Path(DISK), kernel=Path(KERNEL),
                     initrd=Path(INITRD), serial_log=Path(SERIAL))
    assert migrate.files_of(xml) == {
        "disk": DISK, "kernel": KERNEL, "initrd": INITRD, "serial": SERIAL}


def test_files_of_a_guest_that_has_only_some() -> None:
    xml = domain_xml(SPEC, domain_type="qemu", disk=Path(DISK))  # pty console, disk boot
    assert migrate.files_of(xml) == {"disk": DISK}
    assert migrate.files_of(domain_xml(SPEC, domain_type="test")) == {}


def test_files_of_counts_a_disk_not_a_cdrom_and_strips_text() -> None:
    xml = (f"<domain type='kvm'><os><kernel>\n  {KERNEL}\n</kernel></os><devices>"
           "<disk type='file' device='cdrom'><source file='/srv/install.iso'/></disk>"
           f"<disk type='file' device='disk'><source file='{DISK}'/></disk>"
           "</devices></domain>")
    assert migrate.files_of(xml) == {"kernel": KERNEL, "disk": DISK}


@pytest.mark.parametrize(("sample", "backing"), [
    ("guest-live-overlay.xml", True), ("guest-live-plain.xml", False),
    ("guest-inactive-overlay.xml", None)])
def test_a_running_guests_xml_says_whether_its_disk_has_a_backing_file(
        sample: str, backing: bool | None) -> None:
    assert migrate.has_backing((DATA / sample).read_text()) is backing


DEFAULTS = {"max_downtime_ms": None, "bandwidth_mib_s": None, "auto_converge": False,
            "postcopy": False, "timeout_s": 600.0}


def _move(**limits: Any) -> MigrateParams:
    return MigrateParams(vm_uuid=UUID, dest="si-b", mode="live", **limits)


@pytest.mark.parametrize(("params", "limits"), [
    (_move(), DEFAULTS),
    (_move(max_downtime_ms=500, bandwidth_mib_s=100, auto_converge=True, postcopy=True,
           timeout_s=300.0),
     {"max_downtime_ms": 500, "bandwidth_mib_s": 100, "auto_converge": True,
      "postcopy": True, "timeout_s": 300.0}),
    (_move(timeout_s=90), {**DEFAULTS, "timeout_s": 90.0}),
    # What is not a positive number is left to QEMU (the timeout: the node's default).
    (_move(max_downtime_ms=0, bandwidth_mib_s=-5, timeout_s=0.5), DEFAULTS),
])
def test_limits_of_a_migrate_order(params: MigrateParams, limits: dict[str, Any]) -> None:
    out = migrate.limits_of(params)
    assert out == limits
    assert type(out["timeout_s"]) is float


@pytest.mark.parametrize(("transport", "peer", "uri"), [
    ("tls", "10.250.0.7", "qemu+tls://10.250.0.7/system"),
    ("tls", "fd00::7", "qemu+tls://[fd00::7]/system"),
    ("tls", "node-7.fleet.example", "qemu+tls://node-7.fleet.example/system"),
    ("tcp", "10.250.0.7", "qemu+tcp://10.250.0.7/system"),
    ("tcp", "fd00::7", "qemu+tcp://[fd00::7]/system"),
    ("tcp", "node-7.fleet.example", "qemu+tcp://node-7.fleet.example/system"),
])
def test_migration_uri_of_a_peer(transport: str, peer: str, uri: str) -> None:
    assert Migration(address="10.250.0.1", transport=transport).uri(peer) == uri


@pytest.mark.parametrize("peer", ["", "a/b", "10.0.0.7?x", "node:16514"])
def test_a_bad_peer_address_refuses_the_order(peer: str) -> None:
    with pytest.raises(Refused, match=r"the destination's migration address: .* is not a"
                                      r" host address"):
        Migration().uri(peer)


def test_a_bad_transport_refuses_the_order() -> None:
    with pytest.raises(Refused, match="transport 'ssh' is not tls or tcp"):
        Migration(transport="ssh").uri("10.250.0.7")
