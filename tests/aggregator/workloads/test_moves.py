"""Moving VMs between libvirt test-driver nodes through the whole stack: cold moves, refusals
at both ends, drains, and a node lost and back (the aggregator with its managed Mosquitto,
agents as processes). Live migration of real QEMU guests is in
tests/agent/host/test_live_migration.py."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aggregator.cli.client import ApiClientError
from tests.rig import Cutter, Fleet, FleetApi, Process, tweak_config, wait_for

SI_1 = {"site": "ljubljana-tower-7", "country": "SI", "provider": "telekom-slovenije"}
SI_2 = {"site": "maribor-tower-2", "country": "SI", "provider": "telekom-slovenije"}
AT = {"site": "graz-tower-3", "country": "AT", "provider": "a1-telekom"}
LEASE_S, GRACE_S = 3.0, 2.0


@dataclass
class Rig(FleetApi):
    fleet: Fleet
    aggregator: Process
    agents: dict[str, Process]
    cutter: Cutter  # si-tower-02's way to the broker

    def create(self, name: str, **extra: Any) -> dict[str, Any]:
        made: dict[str, Any] = self.api.post("/api/v1/vms", {
            "name": name, "vcpus": 1, "memory_mib": 256, **extra})
        wait_for(lambda: self.vm(name)["actual_state"] == "running", what=f"{name} running")
        return made

    def journal(self, node: str) -> dict[str, str]:
        """The node's own desired state per VM, from its journal."""
        path = self.fleet.dir / "nodes" / node / "state" / "orders.sqlite"
        with sqlite3.connect(path) as db:
            return dict(db.execute("SELECT vm_uuid, state FROM desired").fetchall())

    def cordon(self, node: str, on: bool = True) -> None:
        self.api.post(f"/api/v1/nodes/{node}/{'cordon' if on else 'uncordon'}", {})


@pytest.fixture(scope="module")
def rig(root_dir: Path) -> Iterator[Rig]:
    fleet = Fleet.create(root_dir / "move-fleet", managed_broker=True,
                         overrides={"orders": {"node_loss_grace_s": GRACE_S}})
    aggregator = fleet.aggregator().start()
    cutter = Cutter(fleet.broker_port)
    rig = Rig(fleet, aggregator, {}, cutter)
    try:
        fleet.wait_healthy()
        for node, place in (("si-tower-01", SI_1), ("si-tower-02", SI_2), ("at-tower-01", AT)):
            config = fleet.enroll_node(node, **place)
            tweak_config(config, orders={"lease_s": LEASE_S},
                         **({"broker": {"port": cutter.port}} if node == "si-tower-02" else {}))
            rig.agents[node] = fleet.agent(node).start()
        for node in rig.agents:
            wait_for(lambda node=node: fleet.node(node)["status"] == "online", timeout_s=30,
                     what=f"{node} online")
        yield rig
    finally:
        for proc in rig.agents.values():
            proc.stop()
        cutter.cut()
        assert rig.aggregator.stop() in (0, None)


def test_a_cold_move_takes_a_vm_to_another_node_and_records_it(rig: Rig) -> None:
    rig.cordon("si-tower-02")
    try:
        made = rig.create("mover-1", placement={"countries": ["SI"]})
    finally:
        rig.cordon("si-tower-02", False)
    assert made["node"] == "si-tower-01"
    move = rig.api.post("/api/v1/vms/mover-1/migrate", {"mode": "cold"})
    assert (move["source"], move["dest"], move["mode"]) == ("si-tower-01", "si-tower-02", "cold")
    done = rig.wait_move(move["move"])
    assert done["state"] == "succeeded", done
    assert [(o["node"], o["action"], o["state"]) for o in done["orders"]] == [
        ("si-tower-02", "receive", "succeeded"), ("si-tower-01", "migrate", "succeeded"),
        ("si-tower-02", "adopt", "succeeded")]
    assert done["result"]["mode"] == "cold"
    assert isinstance(done["result"]["duration_ms"], int)
    vm = wait_for(lambda: (v := rig.vm("mover-1"))["actual_state"] == "running" and v,
                  what="mover-1 running at its destination")
    assert vm["node"] == "si-tower-02"
    assert rig.journal("si-tower-02")[made["id"]] == "running"
    assert made["id"] not in rig.journal("si-tower-01")  # the source forgot it
    stays = rig.api.get("/api/v1/vms/mover-1/residency")
    assert stays["chain_valid"]
    assert [(e["node"], e["until"] is None) for e in stays["entries"]] == [
        ("si-tower-01", False), ("si-tower-02", True)]
    listed = rig.api.get("/api/v1/moves", vm="mover-1")["moves"]
    assert [m["id"] for m in listed] == [move["move"]]
    audit = rig.api.get("/api/v1/audit", action="vm.migrate", subject=made["id"])["events"]
    assert [e["detail"]["dest"] for e in audit] == ["si-tower-02"]


def test_moves_that_cannot_be_are_refused_with_the_reason(rig: Rig) -> None:
    made = rig.create("pinned-si", placement={"countries": ["SI"]})

    def refused(body: dict[str, Any], ref: str = "pinned-si") -> ApiClientError:
        with pytest.raises(ApiClientError) as err:
            rig.api.post(f"/api/v1/vms/{ref}/migrate", body)
        return err.value

    err = refused({"to": "at-tower-01", "mode": "cold"})
    assert (err.status, err.code) == (409, "destination_refused")
    assert "country AT not in SI" in str(err)
    err = refused({"mode": "live"})  # test-driver nodes run no QEMU
    assert (err.status, err.code) == (409, "no_live_migration")
    assert refused({"to": made["node"], "mode": "cold"}).code == "same_node"
    assert refused({"to": "nowhere-01", "mode": "cold"}).status == 404
    assert refused({"mode": "warp"}).status == 400
    assert refused({"timeout_s": 0}).status == 400
    assert refused({"postcopy": "yes"}).status == 400
    assert refused({"mode": "cold"}, ref="no-such-vm").status == 404
    assert rig.vm("pinned-si")["node"] == made["node"]


def test_a_destination_refuses_a_vm_its_own_certificate_forbids(rig: Rig) -> None:
    """The aggregator's record says at-tower-01 is in SI (as a mistaken or subverted
    aggregator would); the node's certificate says AT, and the node refuses."""
    rig.cordon("si-tower-02")
    try:
        made = rig.create("stays-si", placement={"countries": ["SI"]})
    finally:
        rig.cordon("si-tower-02", False)
    db = sqlite3.connect(rig.fleet.layout.database)
    try:
        with db:
            db.execute("UPDATE nodes SET country = 'SI' WHERE id = 'at-tower-01'")
        move = rig.api.post("/api/v1/vms/stays-si/migrate", {"to": "at-tower-01",
                                                              "mode": "cold"})
        done = rig.wait_move(move["move"])
    finally:
        with db:
            db.execute("UPDATE nodes SET country = 'AT' WHERE id = 'at-tower-01'")
        db.close()
    assert done["state"] == "failed"
    assert "this node is in AT; the VM may live only in SI" in done["error"]
    assert [o["action"] for o in done["orders"]] == ["receive", "release"]
    vm = rig.vm("stays-si")
    assert (vm["node"], vm["actual_state"]) == (made["node"], "running")
    assert "this node is in AT" in vm["state_reason"]
    assert made["id"] not in rig.journal("at-tower-01")


def test_a_drain_empties_a_node_and_names_what_could_not_move(rig: Rig) -> None:
    rig.cordon("si-tower-02")
    rig.cordon("at-tower-01")
    try:
        names = [f"drainee-{i}" for i in range(4)]
        for name in names:
            assert rig.create(name)["node"] == "si-tower-01"
        rig.create("anchored", placement={"sites": [SI_1["site"]]})
        stopped = rig.create("sleeper")
        rig.api.post("/api/v1/vms/sleeper/stop", {})
        wait_for(lambda: rig.vm("sleeper")["actual_state"] == "shut off", what="sleeper off")
    finally:
        rig.cordon("si-tower-02", False)
        rig.cordon("at-tower-01", False)
    drain = rig.api.post("/api/v1/nodes/si-tower-01/drain", {"parallel": 2})
    assert drain["state"] == "running"
    assert sum(v["state"] == "moving" for v in drain["vms"]) <= 2

    def ended() -> dict[str, Any] | None:
        d: dict[str, Any] = rig.api.get("/api/v1/nodes/si-tower-01/drain")
        return d if d["state"] != "running" else None

    drained = wait_for(ended, timeout_s=60, what="the drain to end")
    assert drained["state"] == "incomplete"
    assert [(v["name"], v["state"]) for v in drained["failed"]] == [("anchored", "failed")]
    assert "no other node can take the VM" in drained["failed"][0]["error"]
    assert "site maribor-tower-2 not in ljubljana-tower-7" in drained["failed"][0]["error"]
    moved = {v["name"]: v for v in drained["vms"] if v["state"] == "moved"}
    assert set(names) | {"sleeper", "mover-1", "pinned-si", "stays-si"} >= set(moved)
    assert set(names) | {"sleeper"} <= set(moved)
    assert rig.fleet.node("si-tower-01")["cordoned"]
    left = [v["name"] for v in rig.api.get("/api/v1/vms", node="si-tower-01")["vms"]]
    assert left == ["anchored"]
    sleeper = rig.vm("sleeper")  # moved cold and not started: it was stopped
    assert sleeper["node"] != "si-tower-01"
    assert sleeper["desired_state"] == "stopped"
    assert rig.journal(sleeper["node"])[stopped["id"]] == "stopped"
    # Nothing was ever started twice: each drained VM's record is one stay, then another.
    for name in names:
        stays = rig.api.get(f"/api/v1/vms/{name}/residency")["entries"]
        assert [e["node"] == "si-tower-01" for e in stays] == [True, False]
    rig.cordon("si-tower-01", False)


def test_an_aggregator_away_past_the_lease_restarts_nothing_elsewhere(rig: Rig) -> None:
    """With the aggregator (and its managed broker) down longer than the nodes' lease plus
    the grace, every node fences its VMs; back up, it has heard no node long enough to call
    any lost: the VMs are resumed where they are."""
    made = rig.create("steadfast", on_node_loss="restart")
    rig.aggregator.stop()
    time.sleep(LEASE_S + GRACE_S + 2)
    wait_for(lambda: rig.journal(made["node"]).get(made["id"]) == "fenced",
             what="the node fencing its VM while cut off")
    rig.aggregator = rig.fleet.aggregator().start()
    rig.fleet.wait_healthy()
    wait_for(lambda: all(rig.fleet.node(n)["status"] == "online" for n in rig.agents),
             timeout_s=30, what="every node back")
    wait_for(lambda: rig.vm("steadfast")["actual_state"] == "running", timeout_s=30,
             what="steadfast resumed")
    assert rig.vm("steadfast")["node"] == made["node"]
    assert rig.api.get("/api/v1/moves", vm="steadfast")["moves"] == []
    assert rig.journal(made["node"])[made["id"]] == "running"


def test_a_lost_node_pauses_its_vm_which_restarts_elsewhere_and_never_resumes(
        rig: Rig) -> None:
    rig.cordon("si-tower-01")
    try:
        made = rig.create("phoenix", on_node_loss="restart", placement={"countries": ["SI"]})
        waiter = rig.create("patient", placement={"countries": ["SI"]})
    finally:
        rig.cordon("si-tower-01", False)
    assert made["node"] == waiter["node"] == "si-tower-02"
    cut_at = time.time()
    rig.cutter.cut()  # si-tower-02 alone loses the broker

    # The node pauses both after its lease; only "phoenix" asked to be restarted elsewhere.
    wait_for(lambda: [rig.journal("si-tower-02").get(v["id"]) for v in (made, waiter)] ==
             ["fenced", "fenced"], timeout_s=LEASE_S + 10,
             what="the cut-off node fencing its VMs")
    moved = wait_for(lambda: (v := rig.vm("phoenix"))["node"] == "si-tower-01" and
                     v["actual_state"] == "running" and v, timeout_s=LEASE_S + GRACE_S + 20,
                     what="phoenix restarted on si-tower-01")
    assert moved["actual_state"] == "running"
    audit = rig.api.get("/api/v1/audit", action="vm.restart", subject=made["id"])["events"]
    assert [(e["detail"]["lost"], e["detail"]["dest"]) for e in audit] == [
        ("si-tower-02", "si-tower-01")]
    patient = rig.vm("patient")
    assert (patient["node"], patient["actual_state"]) == ("si-tower-02", "unknown")
    restart = [o for o in rig.api.get("/api/v1/orders", vm=made["id"])["orders"]
               if o["node"] == "si-tower-01" and o["action"] == "create"]
    assert len(restart) == 1
    # Not before the node's lease and the grace had passed since it was last heard.
    assert restart[0]["created_at"] - cut_at >= LEASE_S + GRACE_S - 1.0

    rig.cutter.restore()
    wait_for(lambda: rig.fleet.node("si-tower-02")["status"] == "online", timeout_s=30,
             what="si-tower-02 back")
    wait_for(lambda: made["id"] not in rig.journal("si-tower-02"), timeout_s=30,
             what="the returned node evicting its copy")
    # The one that waited for its node is resumed there; the restarted one never was.
    wait_for(lambda: rig.vm("patient")["actual_state"] == "running", timeout_s=30,
             what="patient resumed on its node")
    old = [o for o in rig.api.get("/api/v1/orders", vm=made["id"])["orders"]
           if o["node"] == "si-tower-02"]
    assert [o["action"] for o in old] == ["evict", "create"]
    assert old[0]["state"] == "succeeded"
    # The node paused it before the aggregator created it elsewhere (the node's own clock).
    db = sqlite3.connect(rig.fleet.layout.database)
    try:
        (paused_at,) = db.execute(
            "SELECT ts FROM events WHERE node_id = 'si-tower-02' AND vm_uuid = ? AND summary"
            " LIKE '%suspended%'", (made["id"],)).fetchone()
    finally:
        db.close()
    assert paused_at < restart[0]["created_at"]
    stays = rig.api.get("/api/v1/vms/phoenix/residency")
    assert stays["chain_valid"]
    assert [(e["node"], e["until"] is None) for e in stays["entries"]] == [
        ("si-tower-02", False), ("si-tower-01", True)]
    assert rig.vm("phoenix")["node"] == "si-tower-01"
