"""The agent daemon in-process against a real broker and aggregator: lifecycle events reach
the fleet API as they happen, a lost link is noticed at once, and the uplink's backoff stays
within its bounds."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config
from agent.daemon import Agent
from plumbing.backoff import backoff_delay
from tests.rig import Cutter, Fleet, Process, tweak_config, wait_for


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


async def test_a_lost_link_is_noticed_at_once_with_a_publish_unacknowledged(
        fleet: Fleet) -> None:
    """The lease counts from the moment the link is lost: a publish waiting for its
    acknowledgement when the link goes must not hold that moment back by its timeout."""
    path = await asyncio.to_thread(fleet.enroll_node, "de-edge-03", profile="edge-server",
                                   country="DE", provider="ionos", site="berlin-mdc-2")
    relay = Cutter(fleet.broker_port)
    tweak_config(path, broker={"port": relay.port, "connect_timeout_s": 30.0})
    agent = Agent(config.load(path))
    task = asyncio.create_task(agent.run(), name="agent under test")
    try:
        await asyncio.to_thread(wait_for, lambda: agent.uplink.down_since is None,
                                what="the agent connected")
        relay.hold()  # the next telemetry's PUBACK never comes back
        outbox = agent.config.telemetry.spool_path
        await asyncio.to_thread(wait_for, lambda: _waiting(outbox),
                                what="a sample waiting for its acknowledgement")
        await asyncio.sleep(0.5)
        relay.cut()
        cut_at = time.monotonic()
        await asyncio.to_thread(wait_for, lambda: agent.uplink.down_since is not None,
                                timeout_s=25, what="the agent seeing its link gone")
        assert agent.uplink.down_since is not None
        assert agent.uplink.down_since - cut_at < 3.0  # not the 30 s publish timeout
        relay.restore()
        await asyncio.to_thread(wait_for, lambda: agent.uplink.down_since is None,
                                timeout_s=20, what="the agent back")
        await asyncio.to_thread(wait_for, lambda: not _waiting(outbox),
                                what="what waited for its acknowledgement sent again")
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 10)
        relay.cut()


def _waiting(spool: Path) -> int:
    """How many messages the agent's spool holds unacknowledged."""
    with contextlib.closing(sqlite3.connect(spool)) as db:
        (count,) = db.execute("SELECT count(*) FROM outbox").fetchone()
    return int(count)


async def test_every_outage_fences_even_after_a_session_too_short_to_see(
        fleet: Fleet) -> None:
    """The node pauses its guests once per outage past its lease. A session that came and
    went between two looks of the lease (the aggregator may have started guests in it) ends
    in an outage of its own, which fences again."""
    path = await asyncio.to_thread(fleet.enroll_node, "fr-edge-05", profile="edge-server",
                                   country="FR", provider="ovhcloud", site="lyon-mdc-1")
    relay = Cutter(fleet.broker_port)
    tweak_config(path, broker={"port": relay.port, "backoff_initial_s": 0.1,
                               "backoff_max_s": 0.2}, orders={"lease_s": 1.0})
    agent = Agent(config.load(path))
    fences: list[float] = []
    fence = agent.orders.fence

    async def counted() -> tuple[int, int]:
        fences.append(time.monotonic())
        return await fence()

    agent.orders.fence = counted  # type: ignore[method-assign]
    task = asyncio.create_task(agent.run(), name="agent under test")
    try:
        await asyncio.to_thread(wait_for, lambda: agent.uplink.connects == 1,
                                what="the agent connected")
        before = len(fences)  # a slow first connect is an outage of its own
        relay.cut()
        await asyncio.to_thread(wait_for, lambda: len(fences) == before + 1,
                                what="the first fence")
        relay.restore()
        await asyncio.to_thread(wait_for, lambda: agent.uplink.connects == 2, interval_s=0.001,
                                what="the agent back")
        relay.cut()  # at once: the lease looks every quarter lease
        await asyncio.to_thread(wait_for, lambda: len(fences) == before + 2, timeout_s=10,
                                what="a fence for the second outage")
        await asyncio.sleep(1.5)
        assert len(fences) == before + 2  # once per outage
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 10)
        relay.cut()


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
