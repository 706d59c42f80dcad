"""The runner at an agent's start and when cut off (libvirt's test driver): the desired state
restored, orders killed midway finished once, a node cut off past its lease before its start
fencing and starting nothing, and the fence itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nacl.signing

from agent.host.domainxml import domain_xml
from agent.orders.journal import Desired, Journal
from agent.orders.runner import NodeLimits, OrderRunner, Settings, Storage
from contract.profiles import Reservations
from contract.wire import Order, VmSpec, encode, to_plain
from tests.agent.orders.noderig import NODE, Node, running_node, vm_spec


async def _journaled(node: Node, vm: VmSpec, state: str) -> None:
    """As if an earlier order made ``vm`` this node's, wanted ``state``."""
    made = node.signed("create", {}, vm)
    assert await node.journal.accept(made.order_id, made.seq, "create", encode(made),
                                     time.time())
    await node.journal.finish(made.order_id, "succeeded", {}, "", time.time(),
                              Desired(vm.uuid, to_plain(vm), state))


async def _defined(node: Node, vm: VmSpec, *, running: bool) -> None:
    await node.hv.define(domain_xml(vm, domain_type="test"))
    if running:
        await node.hv.change_state(vm.uuid, "start")


async def _killed_midway(node: Node, action: str, params: dict[str, Any],
                         vm: VmSpec | None = None) -> Order:
    """An order journaled as accepted, and the agent killed before it finished."""
    order = node.signed(action, params, vm)
    assert await node.journal.accept(order.order_id, order.seq, action, encode(order),
                                     time.time())
    node.ended.setdefault(order.order_id, asyncio.Event())
    return order


async def _recovered(node: Node) -> None:
    """Until the runner's first recovery is over (orders are handled only after it)."""
    assert (await node.order("release", {"vm_uuid": vm_spec("nothing").uuid})).state == \
        "succeeded"


async def test_a_start_restores_what_the_journal_wants(tmp_path: Path) -> None:
    """After a host reboot (the guests gone or off) the VMs that should run run again, those
    that should be stopped are defined and stay off, one arriving by a move is left alone."""
    lost, parked, off, coming = (vm_spec(n) for n in ("lost", "parked", "off", "coming"))

    async def host_rebooted(node: Node) -> None:
        for vm, state in ((lost, "running"), (parked, "stopped"), (off, "running"),
                          (coming, "incoming")):
            await _journaled(node, vm, state)
        await _defined(node, off, running=False)

    async with running_node(tmp_path, before=host_rebooted) as node:
        await _recovered(node)
        assert [await node.hv.state(vm.uuid) for vm in (lost, parked, off, coming)] == [
            "running", "shut off", "running", None]


async def test_an_order_killed_midway_is_finished_once_at_the_next_start(
        tmp_path: Path) -> None:
    vm = vm_spec("halting")
    stop: list[Order] = []

    async def killed(node: Node) -> None:
        await _journaled(node, vm, "running")
        await _defined(node, vm, running=True)
        stop.append(await _killed_midway(node, "stop", {"vm_uuid": vm.uuid}))

    async with running_node(tmp_path, before=killed) as node:
        done = await node.final(stop[0].order_id)
        assert (done.state, done.result) == ("succeeded", {"state": "shut off"})
        assert node.runner.executed == 1
        node.ended[stop[0].order_id].clear()
        node.submit(stop[0])  # sent again: answered, never run again
        again = await node.final(stop[0].order_id)
        assert (again.state, again.result) == ("succeeded", {"state": "shut off"})
        assert node.runner.executed == 1
        assert node.states(stop[0].order_id) == ["succeeded", "succeeded"]
        want = await node.journal.desired_of(vm.uuid)
        assert want is not None
        assert want.state == "stopped"


async def test_an_order_this_agent_reads_otherwise_fails_at_the_next_start(
        tmp_path: Path) -> None:
    """An order journaled by an agent that took parameters this one refuses is ended as
    failed, with the reason, not left accepted for good."""
    odd: list[Order] = []

    async def journaled(node: Node) -> None:
        odd.append(await _killed_midway(node, "start", {}))

    async with running_node(tmp_path, before=journaled) as node:
        ended = await node.final(odd[0].order_id)
        assert (ended.state, ended.error) == (
            "failed", "refused: malformed start order: params.vm_uuid: missing")
        entry = await node.journal.get(odd[0].order_id)
        assert entry is not None
        assert entry.state == "failed"


async def test_a_node_cut_off_before_its_start_fences_and_starts_nothing(
        tmp_path: Path) -> None:
    """Out of touch past its lease before this start: the guests that run by order are
    paused and marked fenced, an unfinished start fails, nothing lost is made again; only a
    start issued after the fence resumes a guest."""
    running, lost, waiting = vm_spec("running"), vm_spec("lost"), vm_spec("waiting")
    start: list[Order] = []

    async def cut_off(node: Node) -> None:
        await _journaled(node, running, "running")
        await _defined(node, running, running=True)
        await _journaled(node, lost, "running")
        await _journaled(node, waiting, "stopped")
        await _defined(node, waiting, running=False)
        start.append(await _killed_midway(node, "start", {"vm_uuid": waiting.uuid}))

    async with running_node(tmp_path, lease_s=10.0, contact_at_start=time.time() - 100,
                            before=cut_off) as node:
        failed = await node.final(start[0].order_id)
        assert (failed.state, failed.error) == (
            "failed", "not finished: the agent stopped while it ran, and it is cut off past"
            " the lease now")
        await _recovered(node)
        assert [await node.hv.state(vm.uuid) for vm in (running, lost, waiting)] == [
            "paused", None, "shut off"]
        want = await node.journal.desired_of(running.uuid)
        assert want is not None
        assert want.state == "fenced"
        assert await node.journal.fenced_at() is not None

        stale = await node.order("start", {"vm_uuid": running.uuid},
                                 issued_at=time.time() - 5)
        assert (stale.state, stale.error) == (
            "failed", "refused: issued before this node, cut off past its lease, paused the"
            " VM (it may run elsewhere now)")
        fresh = await node.order("start", {"vm_uuid": running.uuid},
                                 issued_at=time.time() + 5)
        assert (fresh.state, fresh.result) == ("succeeded", {"state": "running"})
        want = await node.journal.desired_of(running.uuid)
        assert want is not None
        assert want.state == "running"


async def test_a_fence_pauses_what_runs_by_order_once(tmp_path: Path) -> None:
    async with running_node(tmp_path) as node:
        guest, arriving, parked = vm_spec("guest"), vm_spec("arriving"), vm_spec("parked")
        assert (await node.order("create", {}, vm=guest)).state == "succeeded"
        await _journaled(node, arriving, "incoming")
        await _defined(node, arriving, running=True)
        await _journaled(node, parked, "stopped")
        await _defined(node, parked, running=True)  # started by hand: not the node's to fence
        assert await node.runner.fence() == (2, 0)
        assert [await node.hv.state(vm.uuid) for vm in (guest, arriving, parked)] == [
            "paused", "paused", "running"]
        assert [(w.vm_uuid, w.state) for w in await node.journal.desired()] == [
            (guest.uuid, "fenced"), (arriving.uuid, "incoming"), (parked.uuid, "stopped")]
        assert await node.runner.fence() == (0, 0)  # nothing runs by order any more
        assert await node.hv.state(arriving.uuid) == "paused"


async def test_a_fence_without_libvirt_counts_every_guest_it_could_not_pause(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path / "orders.sqlite")
    await journal.open()
    try:
        runner = OrderRunner(
            settings=Settings(node=NODE, limits=NodeLimits("SI", "arnes", Reservations()),
                              storage=Storage(tmp_path, tmp_path, "https://127.0.0.1:9/", 5.0)),
            key=nacl.signing.SigningKey.generate().verify_key,
            journal=journal, hypervisor=lambda: None, tls=lambda: None, report=_nowhere)
        for n, (name, state) in enumerate((("a", "running"), ("b", "incoming"),
                                           ("c", "stopped")), start=1):
            assert await journal.accept(f"ord-{n}", n, "create", b"", time.time())
            await journal.finish(f"ord-{n}", "succeeded", {}, "", time.time(),
                                 Desired(name, {}, state))
        before = time.time()
        assert await runner.fence() == (0, 2)
        assert [w.state for w in await journal.desired()] == ["running", "incoming", "stopped"]
        fenced_at = await journal.fenced_at()
        assert fenced_at is not None
        assert fenced_at > before
    finally:
        await journal.close()


async def _nowhere(make: object) -> None:
    raise AssertionError("nothing is reported")
