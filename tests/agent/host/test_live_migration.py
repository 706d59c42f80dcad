"""Real QEMU guests moved between two real libvirt hosts through the whole stack: API →
signed orders → agents → peer-to-peer migration over libvirt's TLS with the fleet's own
certificates. The counter a guest prints on its serial port shows it ran on without a
restart; its data disk arrives with it; a migration past its timeout is aborted and the guest
stays; a destination the VM's policy forbids refuses; a drain empties a node."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from typing import Any

import libvirt
import pytest

from agent.host.compat import HostOffers, guest_needs
from aggregator.cli.client import ApiClientError
from tests.fleetrig import TwoHostFleet
from tests.rig import wait_for

BOTH = {"countries": ["SI", "AT"]}


def _qemu_io(disk: str, command: str, *, running: bool) -> str:
    argv = ["qemu-io", "-f", "qcow2", "-c", command, disk]
    if running:  # read beside the running guest: shared lock, read-only
        argv[1:1] = ["-r", "-U"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return done.stdout


def _live_xml(f: TwoHostFleet, node: str, vm_id: str) -> str:
    conn = libvirt.open(f.hosts[node].uri)
    try:
        return str(conn.lookupByUUIDString(vm_id).XMLDesc(0))
    finally:
        conn.close()


def _on_a(f: TwoHostFleet, name: str, **extra: Any) -> dict[str, Any]:
    """A guest created on lab-a (lab-b cordoned meanwhile)."""
    f.api.post("/api/v1/nodes/lab-b/cordon", {})
    try:
        made = f.create(name, **extra)
    finally:
        f.api.post("/api/v1/nodes/lab-b/uncordon", {})
    assert made["node"] == "lab-a"
    return made


def test_the_nodes_serve_libvirt_tls_with_their_fleet_certificates(
        two_host_fleet: TwoHostFleet) -> None:
    f = two_host_fleet
    for node, host in f.hosts.items():
        cert = host.tls_dir / "libvirt" / "servercert.pem"
        fleet_cert = (f.fleet.dir / "nodes" / node / "etc" / "node.crt").read_text()
        assert cert.read_text() == fleet_cert
        assert (host.tls_dir / "CA" / "cacert.pem").read_text() == \
            f.fleet.layout.ca_cert.read_text()
        key = host.tls_dir / "libvirt" / "private" / "serverkey.pem"
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        # The fleet's revocations too: a revoked node's certificate opens no libvirtd.
        assert (host.tls_dir / "CA" / "cacrl.pem").read_text() == \
            f.fleet.layout.crl.read_text()
        assert (host.tls_dir / "qemu" / "ca-crl.pem").exists()
        # What lab-a's libvirtd sees when it opens lab-b's over TLS: the fleet's certificate.
    a, b = f.hosts["lab-a"], f.hosts["lab-b"]
    seen = subprocess.run(
        ["ip", "netns", "exec", a.name, "openssl", "s_client", "-connect",
         f"{b.address}:16514", "-CAfile", str(f.fleet.layout.ca_cert), "-verify_return_error",
         "-cert", str(f.fleet.dir / "nodes" / "lab-a" / "etc" / "node.crt"),
         "-key", str(f.fleet.dir / "nodes" / "lab-a" / "etc" / "node.key")],
        input="", capture_output=True, text=True, timeout=30)
    assert "Verify return code: 0 (ok)" in seen.stdout, seen.stdout + seen.stderr
    assert "CN = lab-b" in seen.stdout


def test_a_running_guest_moves_live_and_its_counter_goes_on(
        two_host_fleet: TwoHostFleet) -> None:
    f = two_host_fleet
    made = _on_a(f, "live-1", placement=BOTH)
    vm_id = made["id"]
    before = f.ticks("lab-a", vm_id)[-1]
    asked = time.monotonic()
    move = f.api.post("/api/v1/vms/live-1/migrate", {"to": "lab-b"})
    assert move["mode"] == "live"
    done = f.wait_move(move["move"])
    took_s = time.monotonic() - asked
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert 0 < result["duration_ms"] < 30_000
    assert 0 <= result["downtime_ms"] < 5_000
    assert result["transferred_bytes"] > 1 << 20
    migrate = next(o for o in done["orders"] if o["action"] == "migrate")
    order = f.api.get(f"/api/v1/orders/{migrate['id']}")
    assert order["result"]["downtime_ms"] == result["downtime_ms"]
    # The source held the guest against what the destination offers, from its receive.
    offers = HostOffers.from_params(order["params"])
    assert offers is not None
    assert offers.machines
    assert offers.cpu_models
    needs = guest_needs(_live_xml(f, "lab-b", vm_id))
    assert (needs.arch, offers.arch) == ("x86_64", "x86_64")
    assert needs.machine in offers.machines
    assert needs.cpu_model in offers.cpu_models
    vm = f.vm("live-1")
    assert (vm["node"], vm["actual_state"]) == ("lab-b", "running")
    wait_for(lambda: len(f.ticks("lab-b", vm_id)) >= 3, timeout_s=30, interval_s=0.5,
             what="the counter going on at lab-b")
    assert f.guest.marker not in f.serial("lab-b", vm_id)  # it did not boot again
    ticks = f.ticks("lab-b", vm_id)
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    # Where it left off at lab-a: the counter ticks five times a second, and goes on.
    assert before < ticks[0] <= before + 5 * (took_s + 2)
    assert not (f.disks("lab-a") / vm_id).exists()  # the source kept nothing
    stays = f.api.get("/api/v1/vms/live-1/residency")
    assert stays["chain_valid"]
    assert [(e["node"], e["country"], e["until"] is None) for e in stays["entries"]] == [
        ("lab-a", "SI", False), ("lab-b", "AT", True)]

    # Back with the CLI, which follows the move to its end.
    env = {**os.environ, "VIRT8RA_API": f.fleet.url, "VIRT8RA_TOKEN": f.fleet.admin_token,
           "COLUMNS": "120"}
    cli = subprocess.run([sys.executable, "-m", "aggregator.cli.operator", "vm", "migrate",
                          "live-1", "--to", "lab-a", "--max-downtime-ms", "300"],
                         capture_output=True, text=True, env=env, timeout=180)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "moved to lab-a" in cli.stdout
    assert "downtime" in cli.stdout
    assert f.vm("live-1")["node"] == "lab-a"
    f.delete("live-1")


def test_a_migration_past_its_timeout_is_aborted_and_the_guest_stays(
        two_host_fleet: TwoHostFleet) -> None:
    f = two_host_fleet
    made = _on_a(f, "slow-1", placement=BOTH)
    # At 1 MiB/s the guest's memory takes minutes: past 4 s the source aborts it.
    move = f.api.post("/api/v1/vms/slow-1/migrate",
                      {"to": "lab-b", "bandwidth_mib_s": 1, "timeout_s": 4,
                       "auto_converge": False})
    seen = wait_for(lambda: (m := f.api.get(f"/api/v1/moves/{move['move']}"))["progress"]
                    .get("data_processed_bytes") and m, timeout_s=30,
                    what="progress from the running migration")
    assert seen["state"] == "migrating"
    assert 0 < seen["progress"]["data_processed_bytes"] < seen["progress"]["data_total_bytes"]
    done = f.wait_move(move["move"])
    assert done["state"] == "failed"
    assert "aborted after 4 s" in done["error"]
    assert "still on lab-a" in done["error"]
    vm = f.vm("slow-1")
    assert (vm["node"], vm["actual_state"]) == ("lab-a", "running")
    before = f.ticks("lab-a", made["id"])[-1]
    wait_for(lambda: f.ticks("lab-a", made["id"])[-1] >= before + 2, timeout_s=20,
             what="the counter going on at lab-a")
    assert [o["action"] for o in done["orders"]] == ["receive", "migrate", "release"]
    wait_for(lambda: not (f.disks("lab-b") / made["id"]).exists(), timeout_s=20,
             what="lab-b dropping what it prepared")
    f.delete("slow-1")


def test_a_disk_goes_with_its_guest_live_and_cold(two_host_fleet: TwoHostFleet) -> None:
    f = two_host_fleet
    made = _on_a(f, "disky-1", disk_gib=1, placement=BOTH)
    vm_id = made["id"]
    for action in ("stop", "start"):  # the data is written while the guest is off
        order = f.api.post(f"/api/v1/vms/disky-1/{action}", {})["order"]
        wait_for(lambda order=order: f.api.get(f"/api/v1/orders/{order}")["state"] ==
                 "succeeded", timeout_s=60, what=f"disky-1 {action}")
        if action == "stop":
            _qemu_io(str(f.disks("lab-a") / vm_id / "disk.qcow2"), "write -P 0x5a 4M 1M",
                     running=False)
    wait_for(lambda: f.vm("disky-1")["actual_state"] == "running", what="disky-1 running")

    live = f.wait_move(f.api.post("/api/v1/vms/disky-1/migrate", {"to": "lab-b"})["move"])
    assert live["state"] == "succeeded", live
    assert live["result"]["disk_bytes"] == 1 << 30  # the whole disk went with it
    at_b = str(f.disks("lab-b") / vm_id / "disk.qcow2")
    assert "Pattern verification failed" not in _qemu_io(at_b, "read -P 0x5a 4M 1M",
                                                         running=True)

    cold = f.wait_move(f.api.post("/api/v1/vms/disky-1/migrate",
                                  {"to": "lab-a", "mode": "cold"})["move"])
    assert cold["state"] == "succeeded", cold
    assert cold["result"]["mode"] == "cold"
    assert cold["result"]["transferred_bytes"] > 0
    wait_for(lambda: f.vm("disky-1")["actual_state"] == "running", what="disky-1 running")
    wait_for(lambda: f.guest.marker in f.serial("lab-a", vm_id), timeout_s=90, interval_s=0.5,
             what="disky-1 booting afresh at lab-a")
    at_a = str(f.disks("lab-a") / vm_id / "disk.qcow2")
    assert "Pattern verification failed" not in _qemu_io(at_a, "read -P 0x5a 4M 1M",
                                                         running=True)
    assert not (f.disks("lab-b") / vm_id).exists()
    assert [e["node"] for e in f.api.get("/api/v1/vms/disky-1/residency")["entries"]] == [
        "lab-a", "lab-b", "lab-a"]
    f.delete("disky-1")


def test_a_destination_the_policy_forbids_refuses_and_the_guest_stays(
        two_host_fleet: TwoHostFleet) -> None:
    f = two_host_fleet
    made = _on_a(f, "si-only", placement={"countries": ["SI"]})
    with pytest.raises(ApiClientError) as err:  # the aggregator's own check
        f.api.post("/api/v1/vms/si-only/migrate", {"to": "lab-b"})
    assert err.value.code == "destination_refused"
    # A wrong record of lab-b's country at the aggregator: lab-b's own certificate says AT.
    db = sqlite3.connect(f.fleet.layout.database)
    try:
        with db:
            db.execute("UPDATE nodes SET country = 'SI' WHERE id = 'lab-b'")
        done = f.wait_move(f.api.post("/api/v1/vms/si-only/migrate", {"to": "lab-b"})["move"])
    finally:
        with db:
            db.execute("UPDATE nodes SET country = 'AT' WHERE id = 'lab-b'")
        db.close()
    assert done["state"] == "failed"
    assert "this node is in AT; the VM may live only in SI" in done["error"]
    vm = f.vm("si-only")
    assert (vm["node"], vm["actual_state"]) == ("lab-a", "running")
    before = f.ticks("lab-a", made["id"])[-1]
    wait_for(lambda: f.ticks("lab-a", made["id"])[-1] > before, timeout_s=20,
             what="si-only counting on at lab-a")
    f.delete("si-only")


def test_a_drain_moves_every_guest_live(two_host_fleet: TwoHostFleet) -> None:
    f = two_host_fleet
    made = [_on_a(f, f"drained-{i}", placement=BOTH) for i in range(2)]
    drain = f.api.post("/api/v1/nodes/lab-a/drain", {"parallel": 2})
    assert drain["state"] == "running"

    def ended() -> dict[str, Any] | None:
        d: dict[str, Any] = f.api.get("/api/v1/nodes/lab-a/drain")
        return d if d["state"] != "running" else None

    try:
        done = wait_for(ended, timeout_s=180, interval_s=0.5, what="the drain to end")
        assert done["state"] == "done", done
        assert done["vms_left"] == 0
        assert {(v["name"], v["state"], v["mode"], v["dest"]) for v in done["vms"]} == {
            (f"drained-{i}", "moved", "live", "lab-b") for i in range(2)}
        assert f.fleet.node("lab-a")["cordoned"]
        for vm in made:
            assert f.guest.marker not in f.serial("lab-b", vm["id"])  # moved, not rebooted
        # Two at a time: the source ran both migrations at once, not one after the other.
        spans = []
        for vm in made:
            (move,) = f.api.get("/api/v1/moves", vm=vm["id"])["moves"]
            migrate = next(o for o in f.api.get(f"/api/v1/moves/{move['id']}")["orders"]
                           if o["action"] == "migrate")
            history = {h["state"]: h["ts"] for h in
                       f.api.get(f"/api/v1/orders/{migrate['id']}")["history"]}
            spans.append((history["accepted"], history["succeeded"]))
        assert max(start for start, _ in spans) < min(end for _, end in spans), spans
    finally:
        f.api.post("/api/v1/nodes/lab-a/uncordon", {})
    for i in range(2):
        f.delete(f"drained-{i}")
