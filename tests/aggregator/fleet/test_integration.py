"""Agents, broker and aggregator together, as processes, over mutual-TLS MQTT and real HTTP."""

from __future__ import annotations

import signal
import ssl
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from aggregator.trust.pki import CertificateAuthority
from contract.wire import HostSample, Telemetry, encode, topic
from plumbing import configfile
from plumbing.tls import client_context
from tests.rig import Fleet, Process, wait_for

NODES = ("si-tower-01", "de-edge-01", "fr-rack-01")
PLACES = {
    "si-tower-01": ("SI", "telekom-slovenije", "ljubljana-tower-7", "tower-5g"),
    "de-edge-01": ("DE", "deutsche-telekom", "munich-mdc-2", "edge-server"),
    "fr-rack-01": ("FR", "ovhcloud", "roubaix-rack-14", "rack-server"),
}
SMALL_SPOOL = "at-tower-01"  # spools at most 10 messages: overflows during an outage


class Rig:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.broker = fleet.broker().start()
        self.aggregator = fleet.aggregator().start()
        fleet.wait_healthy()
        self.agents: dict[str, Process] = {}
        for node_id, (country, provider, site, profile) in PLACES.items():
            fleet.enroll_node(node_id, profile=profile, country=country, provider=provider,
                              site=site)
        config = fleet.enroll_node(SMALL_SPOOL, country="AT", provider="a1-telekom",
                                   site="graz-tower-3")
        with config.open("rb") as fh:
            table = tomllib.load(fh)
        table["telemetry"]["spool_max_messages"] = 10
        config.write_text(configfile.dump_toml(table))
        for node_id in (*NODES, SMALL_SPOOL):
            self.agents[node_id] = fleet.agent(node_id).start()

    def stop(self) -> None:
        for proc in (*self.agents.values(), self.aggregator, self.broker):
            proc.stop()

    def last_seq(self, node_id: str) -> int:
        return int(self.fleet.node(node_id)["sequence"]["telemetry_last_seq"])

    def tls_as(self, node_id: str) -> ssl.SSLContext:
        etc = self.fleet.dir / "nodes" / node_id / "etc"
        return client_context(etc / "ca.crt", etc / "node.crt", etc / "node.key")

    def metrics(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(f"{self.fleet.url}/metrics", timeout=5) as resp:  # noqa: S310
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def rig(root_dir: Path) -> Iterator[Rig]:
    directory = root_dir / "integration"
    rig = Rig(Fleet.create(directory))
    try:
        wait_for(lambda: all(rig.last_seq(n) >= 2 for n in (*NODES, SMALL_SPOOL)),
                 what="telemetry from every agent")
        yield rig
    finally:
        rig.stop()


def _sample(node: str, seq: int) -> Telemetry:
    host = HostSample(cpu_percent=1.0, cpu_count=1, load1=0.0, load5=0.0, load15=0.0,
                      mem_total_bytes=1, mem_available_bytes=1, mem_used_bytes=0,
                      swap_total_bytes=0, swap_used_bytes=0, uptime_s=1.0)
    return Telemetry(node=node, seq=seq, ts=time.time(), interval_s=1.0, host=host)


def test_telemetry_and_inventory_arrive_in_the_api(rig: Rig) -> None:
    nodes = {n["id"]: n for n in rig.fleet.api().get("/api/v1/nodes")["nodes"]}
    for node_id, (country, provider, site, profile) in PLACES.items():
        n = nodes[node_id]
        assert n["status"] == "online"
        assert (n["country"], n["provider"], n["site"], n["profile"]) == (
            country, provider, site, profile)
        assert n["capacity"]["cpus"] > 0
        assert n["capacity"]["memory_bytes"] > 0
        assert n["capacity"]["arch"] == "i686"  # what libvirt's test driver emulates
        assert n["last_seen"] > time.time() - 10
    assert nodes["fr-rack-01"]["capacity"]["cpus"] == 128  # 2 sockets x 32 cores x 2 threads
    assert nodes["fr-rack-01"]["capacity"]["allocatable_cpus"] == 124  # 4 reserved by profile

    detail = rig.fleet.node("de-edge-01")
    host = detail["latest"]["host"]
    assert host["mem_total_bytes"] > 0
    assert host["cpu_count"] >= 1
    assert "filesystems" in host
    assert "nics" in host
    assert sorted(vm["name"] for vm in detail["vms"]) == [
        "de-edge-01-guest-1", "de-edge-01-guest-2", "de-edge-01-guest-3"]
    assert {vm["state"] for vm in detail["vms"]} == {"running"}

    data = rig.fleet.api().get("/api/v1/nodes/si-tower-01/telemetry", metric="cpu_percent,load1")
    assert data["samples"], data
    assert set(data["samples"][-1]["values"]) == {"cpu_percent", "load1"}
    seqs = [s["seq"] for s in data["samples"]]
    assert seqs == sorted(seqs)
    future = rig.fleet.api().get("/api/v1/nodes/si-tower-01/telemetry", since=str(time.time() + 60))
    assert future["samples"] == []


async def test_a_node_cannot_publish_into_another_nodes_topics(rig: Rig) -> None:
    victim = "de-edge-01"
    forged_seq = 10**9
    before = rig.metrics()["virt8ra_ingest_received_total"]
    async with aiomqtt.Client("127.0.0.1", rig.fleet.broker_port, identifier="intruder",
                              tls_context=rig.tls_as("si-tower-01"), timeout=5) as client:
        await client.publish(topic(victim, "telemetry"), encode(_sample(victim, forged_seq)),
                             qos=1)
        await client.publish(topic(victim, "status"), b"forged", qos=1)
        # A control message on the intruder's own topic proves the path to the aggregator works.
        await client.publish(topic("si-tower-01", "events"), b"control", qos=1)
    wait_for(lambda: rig.fleet.node("si-tower-01")["malformed_messages"] >= 1,
             what="the control message")
    node = rig.fleet.node(victim)
    assert node["sequence"]["telemetry_last_seq"] < forged_seq
    assert node["gaps"] == []
    assert node["malformed_messages"] == 0
    assert node["status"] == "online"
    # Only the control message and the agents' own traffic reached ingest, nothing addressed
    # to the victim from the intruder.
    assert rig.metrics()["virt8ra_ingest_received_total"] > before


async def test_clients_without_a_fleet_certificate_are_refused(
    rig: Rig, foreign_pki: CertificateAuthority, root_dir: Path
) -> None:
    ca_file = rig.fleet.layout.ca_cert
    no_cert = ssl.create_default_context(cafile=str(ca_file))
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", rig.fleet.broker_port, tls_context=no_cert,
                                  timeout=3):
            pass
    cert, key = root_dir / "foreign.crt", root_dir / "foreign.key"
    foreign_pki.issue_to_files("si-tower-01", cert, key, server=False)
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", rig.fleet.broker_port,
                                  tls_context=client_context(ca_file, cert, key), timeout=3):
            pass


async def test_malformed_payloads_are_counted_and_dropped(rig: Rig) -> None:
    node = "fr-rack-01"
    before = rig.metrics()["virt8ra_ingest_malformed_total"]
    seq_before = rig.last_seq(node)
    bad: list[bytes] = [
        b"\x00garbage",
        encode(_sample("si-tower-01", 5)),  # another node's id on this node's topic
        b"\x81\xa1v\x01",  # a map with a version and nothing else
        encode(_sample(node, 1))[:-4],  # truncated
    ]
    async with aiomqtt.Client("127.0.0.1", rig.fleet.broker_port, identifier="fuzzer",
                              tls_context=rig.tls_as(node), timeout=5) as client:
        for payload in bad:
            await client.publish(topic(node, "telemetry"), payload, qos=1)
    wait_for(lambda: rig.metrics()["virt8ra_ingest_malformed_total"] >= before + len(bad),
             what="malformed messages to be counted")
    assert rig.fleet.node(node)["malformed_messages"] >= len(bad)
    assert rig.aggregator.running()
    wait_for(lambda: rig.last_seq(node) > seq_before + 2, what="telemetry to keep flowing")


def _contiguous(rig: Rig, node_id: str) -> tuple[list[int], list[dict[str, Any]]]:
    samples = rig.fleet.api().get(f"/api/v1/nodes/{node_id}/telemetry", limit="10000")["samples"]
    return [s["seq"] for s in samples], rig.fleet.node(node_id)["gaps"]


def test_broker_outage_loses_no_sample(rig: Rig) -> None:
    before = {n: rig.last_seq(n) for n in NODES}
    rig.broker.stop()
    time.sleep(6)  # agents sample every 0.5 s and spool meanwhile
    rig.broker = rig.fleet.broker().start()
    wait_for(lambda: all(rig.last_seq(n) > before[n] + 12 for n in NODES), timeout_s=40,
             what="the agents to replay their spools")
    for node_id in NODES:
        seqs, gaps = _contiguous(rig, node_id)
        assert seqs == list(range(1, seqs[-1] + 1)), f"{node_id} lost samples"
        assert gaps == []
    # The node with a 10-message spool could not keep everything, and says so.
    wait_for(lambda: any("spool" in g["reason"] for g in rig.fleet.node(SMALL_SPOOL)["gaps"]),
             what="the small spool's gap report")
    seqs, gaps = _contiguous(rig, SMALL_SPOOL)
    stored = set(seqs)
    missing = {s for g in gaps if g["channel"] == "telemetry"
               for s in range(g["first_seq"], g["last_seq"] + 1)}
    assert missing
    assert not missing & stored
    assert stored | missing == set(range(1, max(stored) + 1))


def test_a_stopped_agent_turns_offline_and_returns(rig: Rig) -> None:
    node = "si-tower-01"
    agent = rig.agents[node]
    agent.stop(signal.SIGKILL)  # no goodbye: the broker publishes the last will
    killed_at = time.monotonic()
    wait_for(lambda: rig.fleet.node(node)["status"] == "offline", timeout_s=10,
             what="the node to go offline")
    assert time.monotonic() - killed_at < 5
    seq = rig.last_seq(node)
    rig.agents[node] = rig.fleet.agent(node).start()
    wait_for(lambda: rig.fleet.node(node)["status"] == "online", what="the node to return")
    wait_for(lambda: rig.last_seq(node) > seq + 1, what="telemetry after the restart")
    seqs, gaps = _contiguous(rig, node)
    assert seqs == list(range(1, seqs[-1] + 1))
    assert gaps == []

    rig.agents[node].stop(signal.SIGTERM)  # a clean stop says offline itself
    wait_for(lambda: rig.fleet.node(node)["reported_status"] == "offline", timeout_s=5,
             what="the clean offline status")
    rig.agents[node] = rig.fleet.agent(node).start()
    wait_for(lambda: rig.fleet.node(node)["status"] == "online", what="the node to return")
