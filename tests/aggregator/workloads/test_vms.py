"""VMs through signed orders, end to end on libvirt test-driver nodes: the aggregator with its
managed Mosquitto, agents as processes, orders signed and checked, images fetched over mTLS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.orders.journal import Journal
from aggregator.cli.client import ApiClient, ApiClientError
from aggregator.trust.pki import OrderSigner
from contract.wire import Order, decode, encode, order_envelope, signed_bytes, topic
from plumbing import configfile
from tests.rig import Fleet, Process, wait_for

SI = {"site": "ljubljana-tower-7", "country": "SI", "provider": "telekom-slovenije"}
AT = {"site": "graz-tower-3", "country": "AT", "provider": "a1-telekom"}


@dataclass
class Rig:
    fleet: Fleet
    aggregator: Process
    agents: dict[str, Process]
    image: Path

    @property
    def api(self) -> ApiClient:
        return self.fleet.api()

    def order(self, order_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api.get(f"/api/v1/orders/{order_id}")
        return found

    def wait_order(self, order_id: str, state: str = "succeeded",
                   timeout_s: float = 30) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            o = self.order(order_id)
            if o["state"] in ("failed", "expired") and state == "succeeded":
                raise AssertionError(f"order {order_id} {o['state']}: {o['error']}")
            return o if o["state"] == state else None

        return wait_for(done, timeout_s=timeout_s, what=f"order {order_id} {state}")

    def vm(self, ref: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api.get(f"/api/v1/vms/{ref}")
        return found

    def agent_db(self, node: str) -> Path:
        return self.fleet.dir / "nodes" / node / "state" / "orders.sqlite"

    def restart_agent(self, node: str, sig: int = signal.SIGTERM) -> None:
        self.agents[node].stop(sig)
        self.agents[node] = self.fleet.agent(node).start()


@pytest.fixture(scope="module")
def rig(root_dir: Path) -> Iterator[Rig]:
    fleet = Fleet.create(root_dir / "vm-fleet", managed_broker=True)
    aggregator = fleet.aggregator().start()
    rig = Rig(fleet, aggregator, {}, root_dir / "vm-fleet-image.raw")
    try:
        fleet.wait_healthy()
        for node, place in (("si-tower-01", SI), ("at-tower-01", AT)):
            fleet.enroll_node(node, **place)
            rig.agents[node] = fleet.agent(node).start()
        for node in rig.agents:
            wait_for(lambda node=node: fleet.node(node)["status"] == "online", timeout_s=30,
                     what=f"{node} online")
        rig.image.write_bytes(os.urandom(1 << 20))
        rig.api.post("/api/v1/images", {"name": "tiny", "path": str(rig.image)})
        yield rig
    finally:
        for proc in rig.agents.values():
            proc.stop()
        assert rig.aggregator.stop() in (0, None)  # None: a test stopped it and failed


@pytest.fixture(autouse=True)
def every_node_online(rig: Rig) -> None:
    """Tests restart brokers, aggregators and agents on purpose: each test starts with every
    node back (an agent reconnects with a backoff of a few seconds)."""
    for node in rig.agents:
        wait_for(lambda node=node: rig.fleet.node(node)["status"] == "online", timeout_s=30,
                 what=f"{node} online")


def _spec(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "vcpus": 1, "memory_mib": 256, "disk_gib": 1,
            "boot": {"image": "tiny"}, **extra}


def test_a_vm_is_created_where_its_policy_allows_and_goes_through_its_life(rig: Rig) -> None:
    made = rig.api.post("/api/v1/vms", _spec("cam-7", placement={"countries": ["SI"]}))
    assert made["node"] == "si-tower-01"
    done = rig.wait_order(made["order"])
    assert done["result"]["state"] == "running"
    assert [h["state"] for h in done["history"]][:1] == ["pending"]
    assert {"sent", "accepted", "succeeded"} <= {h["state"] for h in done["history"]}
    vm = wait_for(lambda: (v := rig.vm("cam-7"))["actual_state"] == "running" and v,
                  what="cam-7 running")
    assert vm["node"] == "si-tower-01"
    assert vm["desired_state"] == "running"
    # The node fetched the image over mTLS and kept it by its digest.
    images = rig.api.get("/api/v1/images")["images"]
    digest = next(i["sha256"] for i in images if i["name"] == "tiny")
    kept = rig.fleet.dir / "nodes" / "si-tower-01" / "state" / "images" / digest
    assert kept.read_bytes() == rig.image.read_bytes()

    for action, actual in (("stop", "shut off"), ("start", "running"), ("reboot", "running")):
        order = rig.api.post(f"/api/v1/vms/{vm['id']}/{action}", {})["order"]
        rig.wait_order(order)
        wait_for(lambda actual=actual: rig.vm("cam-7")["actual_state"] == actual,
                 what=f"cam-7 {actual} after {action}")
    assert rig.vm("cam-7")["desired_state"] == "running"

    order = rig.api.request("DELETE", f"/api/v1/vms/{vm['id']}")["order"]
    rig.wait_order(order)
    with pytest.raises(ApiClientError) as err:
        rig.vm(vm["id"])
    assert err.value.status == 404
    record = rig.api.get(f"/api/v1/vms/{vm['id']}/residency")
    assert record["chain_valid"] is True
    assert [(e["node"], e["country"]) for e in record["entries"]] == [("si-tower-01", "SI")]
    assert record["entries"][0]["until"] is not None


def test_placement_explains_itself_and_refuses_what_fits_nowhere(rig: Rig) -> None:
    dry = rig.api.post("/api/v1/placement/dry-run",
                       _spec("x", placement={"countries": ["AT"]}))
    assert [c["node"] for c in dry["candidates"]] == ["at-tower-01"]
    reasons = {r["node"]: r["reasons"] for r in dry["rejected"]}
    assert any("country" in why for why in reasons["si-tower-01"])
    with pytest.raises(ApiClientError) as err:
        rig.api.post("/api/v1/vms", _spec("huge", memory_mib=1 << 20))
    assert (err.value.status, err.value.code) == (409, "no_placement")
    # The 409 carries every node's reasons, as the dry-run does.
    req = urllib.request.Request(  # noqa: S310 - the test's own aggregator on loopback
        rig.fleet.url + "/api/v1/vms", method="POST",
        data=json.dumps(_spec("nowhere", placement={"countries": ["FR"]})).encode(),
        headers={"Authorization": f"Bearer {rig.fleet.admin_token}",
                 "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=10)  # noqa: S310
    assert http.value.code == 409
    refusal = json.loads(http.value.read())["error"]
    assert refusal["code"] == "no_placement"
    assert refusal["candidates"] == []
    assert {r["node"] for r in refusal["rejected"]} == set(rig.agents)
    assert all(any("country" in why for why in r["reasons"]) for r in refusal["rejected"])


async def _publish_as_control(fleet: Fleet, node: str, payload: bytes) -> None:
    tls = ssl.create_default_context(cafile=str(fleet.layout.ca_cert))
    tls.load_cert_chain(fleet.layout.control_cert, fleet.layout.control_key)
    async with aiomqtt.Client("127.0.0.1", fleet.broker_port, tls_context=tls,
                              identifier="aggregator-control", timeout=5) as client:
        await client.publish(topic(node, "orders"), payload, qos=1)


def _events(rig: Rig, node: str) -> list[str]:
    return [e["summary"] for e in rig.fleet.node(node)["events"]]


def test_forged_and_replayed_orders_are_refused(rig: Rig, root_dir: Path) -> None:
    node = "at-tower-01"
    made = rig.api.post("/api/v1/vms", _spec("replay-me", placement={"countries": ["AT"]}))
    rig.wait_order(made["order"])
    with sqlite3.connect(rig.fleet.layout.database) as db:
        (payload,) = db.execute("SELECT payload FROM orders WHERE id = ?",
                                (made["order"],)).fetchone()
    real = decode(payload)
    assert isinstance(real, Order)

    # Signed by a key that is not the fleet's, published with the broker identity of the
    # aggregator's control session: refused.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    wrong = root_dir / "wrong-order-key.pem"
    wrong.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    forged = Order(node=node, seq=real.seq + 1000, order_id="ord-forged", issued_at=time.time(),
                   expires_at=time.time() + 300, action="delete",
                   params={"vm_uuid": made["id"]})
    forged = _signed(forged, OrderSigner(wrong))
    asyncio.run(_publish_as_control(rig.fleet, node, encode(forged)))
    wait_for(lambda: any("ord-forged: failed (refused: bad signature" in e
                         for e in _events(rig, node)), what="the forged order refused")

    # The real order again: a duplicate, answered with its recorded result, not run again.
    asyncio.run(_publish_as_control(rig.fleet, node, payload))
    # A new order with a number already used, properly signed: a replay, refused.
    signer = OrderSigner(rig.fleet.layout.order_key)
    replay = _signed(Order(node=node, seq=real.seq, order_id="ord-replayed",
                           issued_at=time.time(), expires_at=time.time() + 300,
                           action="delete", params={"vm_uuid": made["id"]}), signer)
    asyncio.run(_publish_as_control(rig.fleet, node, encode(replay)))
    wait_for(lambda: any("ord-replayed: failed (refused: replayed order number" in e
                         for e in _events(rig, node)), what="the replay refused")
    assert rig.vm("replay-me")["actual_state"] == "running"  # the delete never ran
    with sqlite3.connect(rig.agent_db(node)) as db:
        runs = db.execute("SELECT count(*) FROM orders WHERE order_id = ?",
                          (made["order"],)).fetchone()[0]
    assert runs == 1


def _signed(order: Order, signer: OrderSigner) -> Order:
    signature = signer.sign(signed_bytes(order_envelope(order)))
    return Order(node=order.node, seq=order.seq, order_id=order.order_id,
                 issued_at=order.issued_at, expires_at=order.expires_at, action=order.action,
                 params=order.params, signature=signature, vm=order.vm)


def test_agent_killed_between_ack_and_completion_finishes_once(rig: Rig) -> None:
    """The journal holds an accepted order the agent never finished (what SIGKILL right after
    the ack leaves behind): after the restart there is exactly one VM."""
    node = "si-tower-01"
    agent = rig.agents[node]
    os.kill(agent.pid, signal.SIGSTOP)  # frozen: the order reaches it but is not handled
    try:
        made = rig.api.post("/api/v1/vms", _spec("half-done", placement={"countries": ["SI"]}))
        wait_for(lambda: rig.order(made["order"])["state"] == "sent", what="the order sent")
    finally:
        agent.stop(signal.SIGKILL)
    with sqlite3.connect(rig.fleet.layout.database) as db:
        (payload,) = db.execute("SELECT payload FROM orders WHERE id = ?",
                                (made["order"],)).fetchone()
    order = decode(payload)
    assert isinstance(order, Order)

    async def accept_only() -> None:
        journal = Journal(rig.agent_db(node))
        await journal.open()
        assert await journal.accept(order.order_id, order.seq, order.action, payload,
                                    time.time())
        await journal.close()

    asyncio.run(accept_only())
    rig.agents[node] = rig.fleet.agent(node).start()
    rig.wait_order(made["order"])
    wait_for(lambda: rig.vm("half-done")["actual_state"] == "running", what="half-done running")
    names = [v["name"] for v in rig.fleet.node(node)["vms"]]
    wait_for(lambda: [v["name"] for v in rig.fleet.node(node)["vms"]].count("half-done") == 1,
             what="exactly one half-done on the node", timeout_s=15)
    assert names.count("half-done") <= 1


def test_an_order_lost_with_its_node_is_sent_again_when_the_node_returns(rig: Rig) -> None:
    """The node received the order but died before journaling it: when it is back, the
    aggregator sends it again, and it runs once."""
    node = "at-tower-01"
    agent = rig.agents[node]
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        made = rig.api.post("/api/v1/vms", _spec("patient", placement={"countries": ["AT"]}))
        wait_for(lambda: rig.order(made["order"])["state"] == "sent", what="the order sent")
    finally:
        agent.stop(signal.SIGKILL)
    wait_for(lambda: rig.fleet.node(node)["status"] == "offline", what=f"{node} offline")
    assert rig.order(made["order"])["state"] == "sent"
    rig.agents[node] = rig.fleet.agent(node).start()
    rig.wait_order(made["order"])
    assert rig.vm("patient")["actual_state"] == "running"


def test_orders_pending_while_the_broker_is_down_are_delivered_when_it_returns(
        rig: Rig) -> None:
    pid = int((rig.fleet.layout.broker / "broker.pid").read_text())
    os.kill(pid, signal.SIGSTOP)  # the broker answers nobody
    try:
        made = rig.api.post("/api/v1/vms", _spec("through-outage",
                                                 placement={"countries": ["SI"]}))
        time.sleep(2)
        assert rig.order(made["order"])["state"] in ("pending", "sent")
    finally:
        os.kill(pid, signal.SIGCONT)
    rig.wait_order(made["order"], timeout_s=60)
    assert rig.vm("through-outage")["actual_state"] == "running"


def test_aggregator_restart_with_orders_in_flight_loses_none(rig: Rig) -> None:
    made = [rig.api.post("/api/v1/vms", _spec(f"burst-{i}", placement={"countries": ["SI"]}))
            for i in range(5)]
    assert rig.aggregator.stop(signal.SIGKILL) is not None
    rig.aggregator = rig.fleet.aggregator().start()
    rig.fleet.wait_healthy()
    for m in made:
        rig.wait_order(m["order"], timeout_s=60)
    node = "si-tower-01"
    with sqlite3.connect(rig.agent_db(node)) as db:
        for m in made:
            assert db.execute("SELECT count(*) FROM orders WHERE order_id = ?",
                              (m["order"],)).fetchone()[0] == 1
    assert sorted(v["name"] for v in rig.api.get("/api/v1/vms")["vms"]
                  if v["name"].startswith("burst-")) == [f"burst-{i}" for i in range(5)]


def test_cli_and_a_tampered_residency_record(rig: Rig, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    from aggregator.cli.operator import main

    base = ["--api", rig.fleet.url, "--token", rig.fleet.admin_token]
    assert main([*base, "vm", "create", "cli-vm", "--image", "tiny", "--disk", "1",
                 "--country", "SI", "--wait", "30"]) == 0
    assert "create succeeded" in capsys.readouterr().out
    assert main([*base, "vm", "stop", "cli-vm", "--wait", "30"]) == 0
    vm_id = rig.vm("cli-vm")["id"]
    assert main([*base, "vms"]) == 0
    assert vm_id in capsys.readouterr().out  # piped: whole ids, never cut to fit 80 columns
    assert main([*base, "vm", "residency", "cli-vm"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"si-tower-01 .* \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ .*still there", table)
    assert main([*base, "vm", "residency", "cli-vm", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["entries"][0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["from"])
    assert main([*base, "audit", "verify"]) == 0
    with sqlite3.connect(rig.fleet.layout.database) as db:  # someone edits history
        db.execute("UPDATE residency SET country = 'XX' WHERE vm_id = ?", (vm_id,))
    record = rig.api.get(f"/api/v1/vms/{vm_id}/residency")
    assert record["chain_valid"] is False
    assert record["broken_at"] == 1
    capsys.readouterr()
    assert main([*base, "audit", "verify"]) == 1
    assert f"BROKEN {vm_id}" in capsys.readouterr().out.replace("\n", " ")
    with sqlite3.connect(rig.fleet.layout.database) as db:  # put it back for the others
        db.execute("UPDATE residency SET country = 'SI' WHERE vm_id = ?", (vm_id,))


def test_after_a_restart_offline_only_the_vms_that_should_run_run(rig: Rig) -> None:
    """A test-driver host starts empty, like a host after a power cut: with its uplink down
    the agent brings back its VMs from the last signed desired state, and starts only those
    that should run."""
    node = "at-tower-01"
    runs = rig.api.post("/api/v1/vms", _spec("should-run", placement={"countries": ["AT"]}))
    rests = rig.api.post("/api/v1/vms", _spec("should-rest", placement={"countries": ["AT"]}))
    rig.wait_order(runs["order"])
    rig.wait_order(rests["order"])
    rig.wait_order(rig.api.post(f"/api/v1/vms/{rests['id']}/stop", {})["order"])
    pid = int((rig.fleet.layout.broker / "broker.pid").read_text())
    rig.agents[node].stop()
    os.kill(pid, signal.SIGSTOP)  # the uplink is down while the agent starts
    try:
        rig.agents[node] = rig.fleet.agent(node).start()
        wait_for(lambda: "starting " + runs["id"] in rig.agents[node].output(), timeout_s=20,
                 what="the agent restoring the VM that should run")
    finally:
        os.kill(pid, signal.SIGCONT)

    def states() -> dict[str, str]:
        return {v["name"]: v["state"] for v in rig.fleet.node(node)["vms"]}

    wait_for(lambda: states().get("should-run") == "running"
             and states().get("should-rest") == "shut off", timeout_s=30,
             what="should-run running and should-rest defined but off")


def test_the_node_enforces_residency_even_when_the_aggregator_asks(rig: Rig) -> None:
    """A properly signed order to create a VM whose policy forbids this node's country."""
    node = "si-tower-01"
    with sqlite3.connect(rig.fleet.layout.database) as db:
        (last,) = db.execute("SELECT orders_last_seq FROM nodes WHERE id = ?",
                             (node,)).fetchone()
        db.execute("UPDATE nodes SET orders_last_seq = ? WHERE id = ?", (last + 1, node))
    from contract.wire import VmSpec

    spec = VmSpec(uuid="7d4a1c52-0b2e-4f1a-9c3d-5e6f7a8b9c0d", name="at-only", vcpus=1,
                  memory_mib=64, countries=("AT",))
    order = _signed(Order(node=node, seq=last + 1, order_id="ord-at-only",
                          issued_at=time.time(), expires_at=time.time() + 300,
                          action="create", vm=spec),
                    OrderSigner(rig.fleet.layout.order_key))
    asyncio.run(_publish_as_control(rig.fleet, node, encode(order)))
    wait_for(lambda: any("ord-at-only: failed (refused: this node is in SI; the VM may live"
                         " only in AT)" in e for e in _events(rig, node)),
             what="the node refusing the VM")
    assert "at-only" not in {v["name"] for v in rig.fleet.node(node)["vms"]}


def test_a_cordoned_node_takes_nothing_new_and_keeps_what_runs(rig: Rig) -> None:
    node = "si-tower-01"
    running_before = {v["name"] for v in rig.api.get("/api/v1/vms", node=node)["vms"]}
    assert rig.api.post(f"/api/v1/nodes/{node}/cordon", {"reason": "firmware"})["cordoned"]
    try:
        assert rig.fleet.node(node)["cordoned"] is True
        dry = rig.api.post("/api/v1/placement/dry-run", _spec("x", placement={"countries":
                                                                            ["SI"]}))
        assert dry["candidates"] == []
        assert "cordoned" in dict((r["node"], r["reasons"]) for r in dry["rejected"])[node]
        with pytest.raises(ApiClientError) as err:
            rig.api.post("/api/v1/vms", _spec("blocked", placement={"countries": ["SI"]}))
        assert err.value.status == 409
        assert {v["name"] for v in rig.api.get("/api/v1/vms", node=node)["vms"]} == \
            running_before
    finally:
        rig.api.post(f"/api/v1/nodes/{node}/uncordon", {})
    made = rig.api.post("/api/v1/vms", _spec("unblocked", placement={"countries": ["SI"]}))
    assert made["node"] == node
    assert [e["action"] for e in rig.api.get("/api/v1/audit", subject=node)["events"]
            if e["action"].startswith("node.")][:2] == ["node.uncordon", "node.cordon"]


def test_a_node_cut_off_past_its_lease_pauses_its_guests_until_told(rig: Rig) -> None:
    node = "at-tower-01"
    config = rig.fleet.dir / "nodes" / node / "etc" / "agent.toml"
    with config.open("rb") as fh:
        table = tomllib.load(fh)
    table["orders"]["lease_s"] = 2.0
    config.write_text(configfile.dump_toml(table))
    rig.restart_agent(node)
    wait_for(lambda: rig.fleet.node(node)["status"] == "online", what=f"{node} back")
    made = rig.api.post("/api/v1/vms", _spec("leased", placement={"countries": ["AT"]}))
    rig.wait_order(made["order"])

    # A node that stops reporting cannot vouch for its VMs.
    agent = rig.agents[node]
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        vm = wait_for(lambda: (v := rig.vm("leased"))["actual_state"] == "unknown" and v,
                      what="the VM unknown while its node is silent")
        assert "offline" in vm["state_reason"]
    finally:
        os.kill(agent.pid, signal.SIGCONT)

    # Cut off from the broker (the aggregator and its broker are down) past the lease: the
    # node pauses the guest itself.
    assert rig.aggregator.stop() == 0
    wait_for(lambda: re.search(r"paused [1-9]\d* guest\(s\)", agent.output()), timeout_s=20,
             what="the node fencing itself")
    rig.aggregator = rig.fleet.aggregator().start()
    rig.fleet.wait_healthy()
    # Back in touch: the aggregator sees it paused and orders it started again.
    wait_for(lambda: any(e["action"] == "vm.reconcile" and e["subject"] == made["id"]
                         for e in rig.api.get("/api/v1/audit", subject=made["id"])["events"]),
             timeout_s=30, what="the aggregator resuming it")
    wait_for(lambda: rig.vm("leased")["actual_state"] == "running", timeout_s=30,
             what="the VM running again")


def test_removing_the_end_of_a_residency_record_is_detected(rig: Rig) -> None:
    # An earlier test restarted the aggregator: let the node be back before placing on it.
    wait_for(lambda: rig.fleet.node("si-tower-01")["status"] == "online", what="the node")
    made = rig.api.post("/api/v1/vms", _spec("truncated", placement={"countries": ["SI"]}))
    rig.wait_order(made["order"])
    rig.wait_order(rig.api.request("DELETE", f"/api/v1/vms/{made['id']}")["order"])
    assert rig.api.get(f"/api/v1/vms/{made['id']}/residency")["chain_valid"] is True
    with sqlite3.connect(rig.fleet.layout.database) as db:  # the departure disappears
        db.execute("DELETE FROM residency WHERE vm_id = ? AND seq = 2", (made["id"],))
    record = rig.api.get(f"/api/v1/vms/{made['id']}/residency")
    assert (record["chain_valid"], record["broken_at"]) == (False, 2)
    with sqlite3.connect(rig.fleet.layout.database) as db:  # and then all of it
        db.execute("DELETE FROM residency WHERE vm_id = ?", (made["id"],))
    chains = {c["vm"]: c for c in rig.api.get("/api/v1/residency/verify")["chains"]}
    assert chains[made["id"]]["chain_valid"] is False


def test_metrics_count_the_fleets_orders_and_pass_promtool(rig: Rig) -> None:
    made = rig.api.post("/api/v1/vms", _spec("metered", placement={"countries": ["SI"]}))
    rig.wait_order(made["order"])
    with urllib.request.urlopen(f"{rig.fleet.url}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read()
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                             check=False, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.decode().splitlines() if line and not line.startswith("#")}
    assert values['virt8ra_orders{state="succeeded"}'] >= 1
    assert values["virt8ra_orders_published_total"] >= values['virt8ra_orders{state="succeeded"}']
    assert values["virt8ra_order_latency_seconds_count"] >= 1
    assert 0 < values["virt8ra_order_latency_seconds_sum"] < 60 * values[
        "virt8ra_order_latency_seconds_count"]
    assert values['virt8ra_order_latency_seconds_bucket{le="+Inf"}'] == values[
        "virt8ra_order_latency_seconds_count"]
    assert 'virt8ra_moves{state="succeeded"}' in values
