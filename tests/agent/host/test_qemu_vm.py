"""A real QEMU guest through the whole stack: API → signed order → agent → libvirt (system
libvirtd, software emulation) → running, its serial marker, stop, delete."""

from __future__ import annotations

import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.identity.enroll import EnrollOptions, enroll
from aggregator.cli.client import ApiClientError
from plumbing import configfile
from tests.guests import TinyGuest
from tests.rig import Fleet, Process, wait_for


def _serial_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_real_guest_created_through_the_api_boots_stops_and_goes(
        root_dir: Path, system_libvirt: str, tiny_guest: TinyGuest) -> None:
    fleet = Fleet.create(root_dir / "qemu-fleet", managed_broker=True)
    aggregator = fleet.aggregator().start()
    agent = None
    try:
        fleet.wait_healthy()
        api = fleet.api()
        grant = api.post("/api/v1/enrollment-tokens", {
            "site": "ljubljana-lab", "country": "SI", "provider": "arnes",
            "profile": "lab-host"})
        home = fleet.dir / "nodes" / "si-lab-01"
        config = enroll(EnrollOptions(
            aggregator=fleet.url, token=grant["token"], node_id="si-lab-01",
            config_dir=home / "etc", state_dir=home / "state",
            ca_fingerprint=grant["ca_fingerprint"], libvirt_uri=system_libvirt,
            profile="lab-host", domain_type="qemu", interval_s=1.0,
        ))
        with config.open("rb") as fh:
            table = tomllib.load(fh)
        table["orders"]["shutdown_timeout_s"] = 3.0  # the tiny guest ignores ACPI
        config.write_text(configfile.dump_toml(table))
        # As its systemd unit runs it: umask 0077, its state directory made by itself. QEMU
        # runs as libvirt-qemu and must still reach the kernel, initrd and serial log below.
        agent = Process(["sh", "-c", 'umask 077 && exec "$0" "$@"', sys.executable, "-m",
                         "agent", "run", "--config", str(config)],
                        fleet.dir / "logs" / "si-lab-01.log").start()
        wait_for(lambda: fleet.node("si-lab-01")["status"] == "online", timeout_s=30,
                 what="the lab node online")
        for name, path, fmt in (("tiny-kernel", tiny_guest.kernel, "kernel"),
                                ("tiny-initrd", tiny_guest.initrd, "initrd")):
            api.post("/api/v1/images", {"name": name, "path": str(path), "format": fmt})

        made = api.post("/api/v1/vms", {
            "name": "tiny-1", "vcpus": 1, "memory_mib": 128,
            "boot": {"kernel": "tiny-kernel", "initrd": "tiny-initrd",
                     "cmdline": "console=ttyS0"},
            "placement": {"countries": ["SI"]}})
        assert made["node"] == "si-lab-01"

        def order_state(order_id: str) -> str:
            order = api.get(f"/api/v1/orders/{order_id}")
            assert order["state"] not in ("failed", "expired"), order
            return str(order["state"])

        wait_for(lambda: order_state(made["order"]) == "succeeded", timeout_s=90,
                 what="the create order to succeed")
        wait_for(lambda: api.get("/api/v1/vms/tiny-1")["actual_state"] == "running",
                 what="the VM running (from libvirt's events)")
        serial = home / "state" / "disks" / made["id"] / "serial.log"
        wait_for(lambda: tiny_guest.marker in _serial_text(serial), timeout_s=90,
                 interval_s=0.5, what="the guest's serial marker")
        state = home / "state"
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (
            state, state / "images", state / "disks", serial.parent,
            state / "orders.sqlite", state / "spool.sqlite")}
        assert modes == {"state": 0o711, "images": 0o711, "disks": 0o711, made["id"]: 0o711,
                         "orders.sqlite": 0o600, "spool.sqlite": 0o600}

        stop = api.post(f"/api/v1/vms/{made['id']}/stop", {})["order"]
        wait_for(lambda: order_state(stop) == "succeeded", timeout_s=60, what="the stop")
        wait_for(lambda: api.get("/api/v1/vms/tiny-1")["actual_state"] == "shut off",
                 what="the VM shut off")

        gone = api.request("DELETE", f"/api/v1/vms/{made['id']}")["order"]
        wait_for(lambda: order_state(gone) == "succeeded", timeout_s=60, what="the delete")
        with pytest.raises(ApiClientError) as err:
            api.get(f"/api/v1/vms/{made['id']}")
        assert err.value.status == 404
        listed = subprocess.run(["virsh", "-c", system_libvirt, "list", "--all", "--uuid"],
                                capture_output=True, text=True, check=True).stdout
        assert made["id"] not in listed
        assert not (home / "state" / "disks" / made["id"]).exists()
        record = api.get(f"/api/v1/vms/{made['id']}/residency")
        assert record["chain_valid"] is True
        assert record["entries"][0]["node"] == "si-lab-01"
    finally:
        if agent is not None:
            agent.stop()
        aggregator.stop()
