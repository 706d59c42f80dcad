"""The agent daemon in-process against a real broker and aggregator: lifecycle events reach
the fleet API as they happen, and the uplink's backoff stays within its bounds."""

from __future__ import annotations

import asyncio
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
