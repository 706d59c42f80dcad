"""The agent's order runner in-process on libvirt's test driver, fed signed orders as the
uplink hands them over: what a node refuses, and what it answers about a VM that is not
there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.host.domainxml import domain_xml
from agent.orders.journal import Desired
from contract.wire import Order, VmSpec, encode, to_plain
from tests.agent.orders.noderig import Node, running_node, vm_spec


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with running_node(tmp_path) as started:
        yield started


async def test_the_source_keeps_a_guest_the_destination_cannot_run(node: Node) -> None:
    """A migrate naming a destination whose offers do not fit the guest is refused before
    libvirt is asked; the guest runs on where it was."""
    spec = vm_spec("stays")
    await node.hv.define(domain_xml(spec, domain_type="test"))
    await node.hv.change_state(spec.uuid, "start")
    move = {"vm_uuid": spec.uuid, "dest": "si-b", "mode": "live", "address": "127.0.0.3",
            "domain_type": "qemu", "dest_cpu_models": "?"}
    arm = await node.order("migrate", {**move, "dest_arch": "aarch64",
                                       "dest_machines": "virt virt-7.2"})
    assert (arm.state, arm.error) == (
        "failed", "refused: the guest cannot run on si-b as it runs here: the guest is i686,"
        " the destination runs aarch64 guests")
    # Where the destination tells nothing more than its arch, the guest's passes; the next
    # check (the kind of guests) is what stops this one.
    same = await node.order("migrate", {**move, "dest_arch": "i686", "dest_machines": "?"})
    assert same.error == "refused: the destination runs qemu guests, this VM is a test guest"
    assert await node.hv.state(spec.uuid) == "running"


async def test_a_node_that_says_a_vm_is_not_there_never_makes_it_afterwards(
        node: Node) -> None:
    """``release`` answers whether the VM is here. Once it said no, what the journal still
    wanted of the VM is gone: a restart of the agent does not define it again."""
    spec = vm_spec("gone")
    made = await node.order("create", {"vm_uuid": spec.uuid, "start": True}, vm=spec)
    assert made.state == "succeeded", made.error
    await node.hv.change_state(spec.uuid, "destroy")
    await node.hv.undefine(spec.uuid)  # lost here, though the journal still wants it
    assert (await node.journal.desired_of(spec.uuid)) is not None
    asked = await node.order("release", {"vm_uuid": spec.uuid})
    assert (asked.state, asked.result) == ("succeeded", {"present": False})
    assert await node.journal.desired_of(spec.uuid) is None

    here = vm_spec("here")
    made = await node.order("create", {"vm_uuid": here.uuid, "start": True}, vm=here)
    asked = await node.order("release", {"vm_uuid": here.uuid})
    assert (asked.state, asked.result) == ("succeeded", {"present": True, "state": "running"})
    assert await node.journal.desired_of(here.uuid) is not None


async def test_libvirt_back_after_a_moment_fences_nothing(tmp_path: Path) -> None:
    """Only the time before the agent's start counts as an outage at a recovery: libvirt
    reconnecting later, more than a lease after the start, pauses no guest."""
    async with running_node(tmp_path, lease_s=1.0, contact_at_start=time.time()) as node:
        spec = vm_spec("steady")
        made = await node.order("create", {"vm_uuid": spec.uuid, "start": True}, vm=spec)
        assert made.state == "succeeded", made.error
        await asyncio.sleep(1.5)
        assert await node.runner._try_recover()  # as after libvirt was away for a moment
        assert await node.hv.state(spec.uuid) == "running"
        want = await node.journal.desired_of(spec.uuid)
        assert want is not None
        assert want.state == "running"


async def test_a_create_left_unfinished_and_expired_leaves_nothing(tmp_path: Path) -> None:
    """The agent was killed after it had defined and started the VM, and the order expired
    before it came back: the order fails, and the half-made VM goes (the aggregator may make
    it elsewhere now). A VM the node had before such an order stays."""
    half, kept = vm_spec("half-made"), vm_spec("kept")

    async def accept(node: Node, vm: VmSpec, ttl_s: float) -> Order:
        order = node.signed("create", {"vm_uuid": vm.uuid, "start": True}, vm, ttl_s)
        assert await node.journal.accept(order.order_id, order.seq, "create", encode(order),
                                         time.time())
        node.ended.setdefault(order.order_id, asyncio.Event())
        return order

    async def killed_midway(node: Node) -> None:
        made = await accept(node, kept, 600)  # "kept" was made here before, and journaled
        await node.journal.finish(made.order_id, "succeeded", {}, "", time.time(),
                                  Desired(kept.uuid, to_plain(kept), "running"))
        for vm in (kept, half):  # then two creates, killed midway, now expired
            await accept(node, vm, -1.0)
            if await node.hv.state(vm.uuid) is None:
                await node.hv.define(domain_xml(vm, domain_type="test"))
                await node.hv.change_state(vm.uuid, "start")

    async with running_node(tmp_path, before=killed_midway) as node:
        for order_id in ("ord-2", "ord-3"):
            await asyncio.wait_for(node.ended[order_id].wait(), 10)
        ends = {r.order_id: (r.state, r.error) for r in node.reports}
        assert ends["ord-3"] == ("failed", "not finished: the agent stopped while it ran, and"
                                 " it is expired now")
        assert await node.hv.state(half.uuid) is None
        assert await node.hv.state(kept.uuid) == "running"


async def test_an_order_with_malformed_parameters_is_refused_before_it_is_accepted(
        node: Node) -> None:
    """Parameters that break the contract (contract/orders.py) are refused with the key
    named, as an unknown action is: never journaled, never accepted."""
    for action, params, error in (
            ("start", {}, "refused: malformed start order: params.vm_uuid: missing"),
            ("adopt", {"vm_uuid": "vm-a", "mode": "live", "start": "yes"},
             "refused: malformed adopt order: params.start: expected a boolean, got str"),
            ("teleport", {"vm_uuid": "vm-a"}, "refused: unknown action 'teleport'")):
        order = node.signed(action, params)
        refused = await node.final(node.submit(order))
        assert (refused.state, refused.error) == ("failed", error)
        assert node.states(order.order_id) == ["failed"]
        assert await node.journal.get(order.order_id) is None
    assert await node.journal.last_seq() == 0
