"""Two real libvirt hosts (``demo.tworig``) as two enrolled nodes of a running fleet:
the aggregator with its managed Mosquitto, one agent per host with live migration over TLS
on the fleet's certificates, and the tiny guest's kernel and initrd registered as images.
Set up once per test session (``two_host_fleet`` in conftest); tests delete their VMs."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.identity.enroll import EnrollOptions, enroll
from demo.guestimage import TICK_PREFIX, TinyGuest
from demo.tworig import Host, TwoHosts
from tests.rig import Fleet, FleetApi, Process, tweak_config, wait_for

RIG_NAME = "v8fleet"  # not the raw rig's (tests/demo/test_tworig.py): both may be up at once
NODES = {  # node id -> where its certificate says it is
    "lab-a": {"site": "ljubljana-lab", "country": "SI", "provider": "arnes"},
    "lab-b": {"site": "graz-lab", "country": "AT", "provider": "a1-telekom"},
}
TICK = re.compile(rf"{TICK_PREFIX} (\d+)\n")


@dataclass
class TwoHostFleet(FleetApi):
    rig: TwoHosts
    fleet: Fleet
    aggregator: Process
    agents: dict[str, Process]
    hosts: dict[str, Host]  # node id -> its libvirt host
    guest: TinyGuest

    def disks(self, node: str) -> Path:
        return self.fleet.dir / "nodes" / node / "state" / "disks"

    def serial(self, node: str, vm_id: str) -> str:
        path = self.disks(node) / vm_id / "serial.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ticks(self, node: str, vm_id: str) -> list[int]:
        return [int(n) for n in TICK.findall(self.serial(node, vm_id))]

    def create(self, name: str, **extra: Any) -> dict[str, Any]:
        """A tiny guest through the API, running and counting on its serial port."""
        made: dict[str, Any] = self.api.post("/api/v1/vms", {
            "name": name, "vcpus": 1, "memory_mib": 128,
            "boot": {"kernel": "tiny-kernel", "initrd": "tiny-initrd",
                     "cmdline": "console=ttyS0"}, **extra})
        wait_for(lambda: self.vm(name)["actual_state"] == "running", timeout_s=90,
                 what=f"{name} running")
        wait_for(lambda: len(self.ticks(made["node"], made["id"])) >= 2, timeout_s=120,
                 interval_s=0.5, what=f"{name} counting on its serial port")
        return made

    def delete(self, ref: str) -> None:
        order = self.api.request("DELETE", f"/api/v1/vms/{ref}")["order"]
        if order is not None:
            wait_for(lambda: self.api.get(f"/api/v1/orders/{order}")["state"] in (
                "succeeded", "failed", "expired"), timeout_s=60, what=f"{ref} deleted")


@pytest.fixture(scope="session")
def two_host_fleet(root_dir: Path, tiny_guest: TinyGuest) -> Iterator[TwoHostFleet]:
    guest = tiny_guest
    workdir = Path(tempfile.mkdtemp(prefix="fleetrig-", dir=root_dir))
    workdir.chmod(0o755)  # the broker's user reaches its files below
    with TwoHosts(workdir, name=RIG_NAME) as rig:
        fleet = Fleet.create(workdir / "fleet", managed_broker=True)
        aggregator = fleet.aggregator().start()
        out = TwoHostFleet(rig, fleet, aggregator, {}, {}, guest)
        try:
            fleet.wait_healthy()
            api = fleet.api()
            for (node, place), host in zip(NODES.items(), rig.hosts, strict=True):
                grant = api.post("/api/v1/enrollment-tokens", {**place, "profile": "lab-host"})
                home = fleet.dir / "nodes" / node
                config = enroll(EnrollOptions(
                    aggregator=fleet.url, token=grant["token"], node_id=node,
                    config_dir=home / "etc", state_dir=home / "state",
                    ca_fingerprint=grant["ca_fingerprint"], libvirt_uri=host.uri,
                    profile="lab-host", domain_type="qemu", interval_s=1.0,
                    migration_address=host.address, migration_transport="tls",
                    tls_dir=host.tls_dir, admin_uri=host.admin_uri))
                # The tiny guest ignores ACPI; tests restart brokers: reconnect quickly.
                tweak_config(config, orders={"shutdown_timeout_s": 3.0},
                             broker={"backoff_max_s": 4.0})
                out.hosts[node] = host
                out.agents[node] = fleet.agent(node).start()
            for node in out.agents:
                wait_for(lambda node=node: fleet.node(node)["status"] == "online",
                         timeout_s=60, what=f"{node} online")
            for name, path, fmt in (("tiny-kernel", guest.kernel, "kernel"),
                                    ("tiny-initrd", guest.initrd, "initrd")):
                copy = workdir / path.name
                shutil.copyfile(path, copy)
                api.post("/api/v1/images", {"name": name, "path": str(copy), "format": fmt})
            yield out
        finally:
            for proc in out.agents.values():
                proc.stop()
            aggregator.stop()
