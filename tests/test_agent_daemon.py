"""The agent daemon in-process against a real broker and aggregator: lifecycle events reach
the fleet API as they happen, and the uplink's backoff stays within its bounds."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config
from agent.daemon import Agent
from agent.uplink import backoff_delay
from tests.rig import Fleet, Process, wait_for


@pytest.fixture(scope="module")
def fleet(root_dir: Path) -> Iterator[Fleet]:
    fleet = Fleet.create(root_dir / "agent-daemon")
    procs: list[Process] = [fleet.broker().start(), fleet.aggregator().start()]
    try:
        fleet.wait_healthy()
        yield fleet
    finally:
        for proc in reversed(procs):
            proc.stop()


async def test_lifecycle_events_reach_the_api(fleet: Fleet) -> None:
    path = await asyncio.to_thread(fleet.enroll_node, "it-edge-07", profile="edge-server",
                                   country="IT", provider="aruba", site="milan-mdc-1")
    agent = Agent(config.load(path))
    task = asyncio.create_task(agent.run(), name="agent under test")
    try:
        await asyncio.to_thread(wait_for, lambda: fleet.node("it-edge-07")["vms"],
                                what="guest figures")
        guest = fleet.node("it-edge-07")["vms"][0]
        assert agent.hypervisor is not None
        await agent.hypervisor.change_state(guest["uuid"], "suspend")

        def suspended() -> bool:
            return any(e["type"] == "lifecycle" and e["vm_uuid"] == guest["uuid"]
                       and "suspended" in e["summary"]
                       for e in fleet.node("it-edge-07")["events"])

        await asyncio.to_thread(wait_for, suspended, what="the suspended event")
        await asyncio.to_thread(
            wait_for,
            lambda: {vm["state"] for vm in fleet.node("it-edge-07")["vms"]
                     if vm["uuid"] == guest["uuid"]} == {"paused"},
            what="the paused state in telemetry")
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 10)
    assert fleet.node("it-edge-07")["reported_status"] == "offline"


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    assert backoff_delay(0, 1.0, 60.0, 1.0) == 1.0
    assert backoff_delay(3, 1.0, 60.0, 1.0) == 8.0
    assert backoff_delay(10, 1.0, 60.0, 1.0) == 60.0
    assert backoff_delay(500, 1.0, 60.0, 0.5) == 30.0
    assert backoff_delay(3, 1.0, 60.0, 0.0) == 0.0


def _notifications(sock: socket.socket, until: str, timeout_s: float = 20) -> list[str]:
    got: list[str] = []
    sock.settimeout(timeout_s)
    while until not in got:
        got.append(sock.recv(4096).decode())
    return got


def test_both_daemons_speak_systemds_notify_protocol(fleet: Fleet, workdir: Path) -> None:
    """Type=notify with a watchdog: READY=1 once serving, WATCHDOG=1 while alive, STOPPING=1."""
    path = fleet.enroll_node("hr-tower-02", country="HR", provider="hrvatski-telekom",
                             site="zagreb-tower-12")
    address = str(workdir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
        agent = Process([sys.executable, "-m", "agent", "run", "--config", str(path)],
                        workdir / "agent.log", env=env).start()
        try:
            got = _notifications(sock, "READY=1")
            got += _notifications(sock, "WATCHDOG=1")
            got += _notifications(sock, "WATCHDOG=1")  # every half watchdog period, at least
        finally:
            agent.stop()
        got += _notifications(sock, "STOPPING=1")
        assert got.index("READY=1") < got.index("WATCHDOG=1")

        other = Fleet.create(workdir / "aggregator", managed_broker=True)
        aggregator = Process(
            [sys.executable, "-m", "aggregator", "serve", "--data-dir", str(other.dir)],
            workdir / "aggregator.log", env=env).start()
        try:
            assert "READY=1" in _notifications(sock, "READY=1")
            assert "WATCHDOG=1" in _notifications(sock, "WATCHDOG=1")
        finally:
            aggregator.stop()
        assert "STOPPING=1" in _notifications(sock, "STOPPING=1")
