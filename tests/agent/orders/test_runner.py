"""The agent's order runner in-process on libvirt's test driver, fed signed orders as the
uplink hands them over: what a node refuses, and what it answers about a VM that is not
there."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from agent.host.domainxml import domain_xml
from agent.host.hypervisor import Hypervisor
from agent.orders.journal import Desired, Journal
from agent.orders.runner import Migration, NodeLimits, OrderRunner, Storage
from contract.profiles import Reservations
from contract.wire import (
    Order,
    Report,
    VmSpec,
    decode,
    encode,
    order_envelope,
    signed_bytes,
    to_plain,
)

NODE = "si-a"


@dataclass
class Node:
    runner: OrderRunner
    hv: Hypervisor
    journal: Journal
    key: nacl.signing.SigningKey
    reports: list[Report] = field(default_factory=list)
    ended: dict[str, asyncio.Event] = field(default_factory=dict)
    seq: int = 0

    def signed(self, action: str, params: dict[str, Any], vm: VmSpec | None = None,
               ttl_s: float = 600) -> Order:
        self.seq += 1
        now = time.time()
        order = Order(node=NODE, seq=self.seq, order_id=f"ord-{self.seq}", issued_at=now,
                      expires_at=now + ttl_s, action=action, params=params, vm=vm)
        return dataclasses.replace(
            order, signature=self.key.sign(signed_bytes(order_envelope(order))).signature)

    async def order(self, action: str, params: dict[str, Any],
                    vm: VmSpec | None = None) -> Report:
        """Sign and hand over one order; its final report."""
        signed = self.signed(action, params, vm)
        ended = self.ended.setdefault(signed.order_id, asyncio.Event())
        self.runner.submit(signed, encode(signed))
        await asyncio.wait_for(ended.wait(), 10)
        return next(r for r in reversed(self.reports) if r.order_id == signed.order_id)


@contextlib.asynccontextmanager
async def _running_node(tmp_path: Path, lease_s: float = 0.0, contact_at_start: float | None = None,
                        before: Callable[[Node], Awaitable[None]] | None = None,
                        ) -> AsyncIterator[Node]:
    """A runner on the test driver; ``before`` sets the scene before it starts (it recovers
    first thing, as at an agent's start)."""
    hv = await Hypervisor.open("test:///default")
    journal = Journal(tmp_path / "orders.sqlite")
    await journal.open()
    key = nacl.signing.SigningKey.generate()
    reports: list[Report] = []
    ended: dict[str, asyncio.Event] = {}

    async def report(make: Callable[[int], bytes]) -> None:
        sent = decode(make(len(reports) + 1))
        assert isinstance(sent, Report)
        reports.append(sent)
        if sent.state not in ("accepted", "progress"):
            ended.setdefault(sent.order_id, asyncio.Event()).set()

    runner = OrderRunner(
        NODE, key.verify_key, journal, lambda: hv,
        NodeLimits("SI", "arnes", Reservations()),
        Storage(tmp_path / "images", tmp_path / "disks", "https://127.0.0.1:9/", 5.0),
        lambda: None, report, Migration("127.0.0.2"), lease_s)
    runner.contact_at_start = contact_at_start
    node = Node(runner, hv, journal, key, reports, ended)
    if before is not None:
        await before(node)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        yield node
    finally:
        stop.set()
        await task
        await journal.close()
        hv.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with _running_node(tmp_path) as started:
        yield started


def _spec(name: str) -> VmSpec:
    return VmSpec(uuid=str(uuid.uuid4()), name=name, vcpus=1, memory_mib=64)


async def test_the_source_keeps_a_guest_the_destination_cannot_run(node: Node) -> None:
    """A migrate naming a destination whose offers do not fit the guest is refused before
    libvirt is asked; the guest runs on where it was."""
    spec = _spec("stays")
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
    spec = _spec("gone")
    made = await node.order("create", {"vm_uuid": spec.uuid, "start": True}, vm=spec)
    assert made.state == "succeeded", made.error
    await node.hv.change_state(spec.uuid, "destroy")
    await node.hv.undefine(spec.uuid)  # lost here, though the journal still wants it
    assert (await node.journal.desired_of(spec.uuid)) is not None
    asked = await node.order("release", {"vm_uuid": spec.uuid})
    assert (asked.state, asked.result) == ("succeeded", {"present": False})
    assert await node.journal.desired_of(spec.uuid) is None

    here = _spec("here")
    made = await node.order("create", {"vm_uuid": here.uuid, "start": True}, vm=here)
    asked = await node.order("release", {"vm_uuid": here.uuid})
    assert (asked.state, asked.result) == ("succeeded", {"present": True, "state": "running"})
    assert await node.journal.desired_of(here.uuid) is not None


async def test_libvirt_back_after_a_moment_fences_nothing(tmp_path: Path) -> None:
    """Only the time before the agent's start counts as an outage at a recovery: libvirt
    reconnecting later, more than a lease after the start, pauses no guest."""
    async with _running_node(tmp_path, lease_s=1.0, contact_at_start=time.time()) as node:
        spec = _spec("steady")
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
    half, kept = _spec("half-made"), _spec("kept")

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

    async with _running_node(tmp_path, before=killed_midway) as node:
        for order_id in ("ord-2", "ord-3"):
            await asyncio.wait_for(node.ended[order_id].wait(), 10)
        ends = {r.order_id: (r.state, r.error) for r in node.reports}
        assert ends["ord-3"] == ("failed", "not finished: the agent stopped while it ran, and"
                                 " it is expired now")
        assert await node.hv.state(half.uuid) is None
        assert await node.hv.state(kept.uuid) == "running"
