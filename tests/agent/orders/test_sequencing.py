"""How the runner sequences orders around a migration (on libvirt's test driver, which cannot
migrate: a migration here is held until the test lets it end). A migration runs beside the
orders after it; an order about the migrating VM waits for it; recovery leaves it alone;
stopping lets it finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.host.domainxml import domain_xml
from agent.host.hypervisor import Hypervisor, MigrationProgress, MigrationResult
from agent.orders.journal import Journal
from contract.wire import VmSpec
from tests.agent.orders.noderig import Node, running_node, vm_spec


class HeldMigrations(Hypervisor):
    """The test driver, with migrations that report progress once, then wait for
    :attr:`release` and end as a real one does (the guest gone from here)."""

    release: asyncio.Event
    started: asyncio.Event  # set at the first call
    calls: list[str]

    def hold(self) -> HeldMigrations:
        self.release, self.started, self.calls = asyncio.Event(), asyncio.Event(), []
        return self

    async def migrate(self, vm_uuid: str, dest_uri: str, *,
                      progress: Callable[[MigrationProgress], None] | None = None,
                      **_: Any) -> MigrationResult:
        self.calls.append(vm_uuid)
        self.started.set()
        if progress is not None:
            progress(MigrationProgress(*([1] * 13)))
        await self.release.wait()
        await self.undefine(vm_uuid)
        return MigrationResult(duration_ms=5, downtime_ms=1, transferred_bytes=64 << 20,
                               memory_bytes=64 << 20, disk_bytes=None, memory_iterations=2,
                               job_elapsed_ms=5)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with running_node(tmp_path, hypervisor=HeldMigrations) as started:
        assert isinstance(started.hv, HeldMigrations)
        started.hv.hold()
        yield started
        started.hv.release.set()  # (the runner waits for migrations before it stops)


async def _running(node: Node, name: str) -> VmSpec:
    made = vm_spec(name)
    await node.hv.define(domain_xml(made, domain_type="test"))
    await node.hv.change_state(made.uuid, "start")
    return made


async def _started(node: Node) -> None:
    """Until the node's first migration has begun."""
    assert isinstance(node.hv, HeldMigrations)
    await asyncio.wait_for(node.hv.started.wait(), 10)


def _move(vm: VmSpec) -> dict[str, Any]:
    return {"vm_uuid": vm.uuid, "dest": "si-b", "mode": "live", "address": "127.0.0.3",
            "domain_type": "test", "dest_country": "SI", "dest_provider": "arnes",
            "max_downtime_ms": 300, "auto_converge": True, "postcopy": False,
            "timeout_s": 300.0}


async def test_a_migration_runs_beside_the_orders_after_it(node: Node) -> None:
    """Another VM's orders run while a migration goes on; an order about the migrating VM
    waits for the migration's end, and runs after it."""
    moving, other = await _running(node, "moving"), await _running(node, "other")
    assert isinstance(node.hv, HeldMigrations)
    migrate = node.submit(node.signed("migrate", _move(moving)))
    await _started(node)
    stopped = await node.order("stop", {"vm_uuid": other.uuid})
    assert (stopped.state, stopped.result) == ("succeeded", {"state": "shut off"})
    assert node.states(migrate) == ["accepted", "progress"]

    reboot = node.submit(node.signed("reboot", {"vm_uuid": moving.uuid}))
    await asyncio.sleep(0.2)
    assert node.states(reboot) == ["accepted"]  # journaled; it waits, the queue with it
    node.hv.release.set()
    done = await node.final(migrate)
    assert (done.state, done.result["mode"], done.result["dest"]) == ("succeeded", "live", "si-b")
    assert done.result["downtime_ms"] == 1
    after = await node.final(reboot)
    assert after.state == "failed"  # the VM is gone from here now
    assert [r.order_id for r in node.reports if r.state in ("succeeded", "failed")][-2:] == [
        migrate, reboot]
    assert await node.hv.state(moving.uuid) is None
    assert await node.journal.desired_of(moving.uuid) is None


async def test_recovery_leaves_a_migration_beside_alone(node: Node) -> None:
    """A recovery while a migration runs (libvirt was away for a moment) finds its order
    accepted and unfinished, and does not run it a second time."""
    moving = await _running(node, "moving")
    assert isinstance(node.hv, HeldMigrations)
    migrate = node.submit(node.signed("migrate", _move(moving)))
    await _started(node)
    assert await node.runner._try_recover()
    entry = await node.journal.get(migrate)
    assert entry is not None
    assert entry.state == "accepted"
    node.hv.release.set()
    assert (await node.final(migrate)).state == "succeeded"
    assert node.hv.calls == [moving.uuid]
    assert node.states(migrate).count("succeeded") == 1


async def test_stopping_lets_a_migration_beside_finish(tmp_path: Path) -> None:
    """The runner stops only once its migrations beside have ended (one cancelled at its
    very end would leave the VM defined here and there)."""
    async with running_node(tmp_path, hypervisor=HeldMigrations) as node:
        hv = node.hv
        assert isinstance(hv, HeldMigrations)
        hv.hold()
        moving = await _running(node, "moving")
        migrate = node.submit(node.signed("migrate", _move(moving)))
        await _started(node)
        # The rig stops the runner at the end of this block: the migration ends only a
        # moment after.
        asyncio.get_running_loop().call_later(0.3, hv.release.set)
    assert hv.release.is_set()
    assert node.states(migrate)[-1] == "succeeded"
    journal = Journal(tmp_path / "orders.sqlite")
    await journal.open()
    try:
        entry = await journal.get(migrate)
    finally:
        await journal.close()
    assert entry is not None
    assert entry.state == "succeeded"
