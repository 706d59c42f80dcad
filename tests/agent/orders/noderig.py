"""An order runner on libvirt's test driver, fed signed orders as the uplink hands them over,
its reports collected: the rig of the runner's tests."""

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

from agent.host.hypervisor import Hypervisor
from agent.orders.journal import Journal
from agent.orders.runner import Migration, NodeLimits, OrderRunner, Settings, Storage
from contract.profiles import Reservations
from contract.wire import Order, Report, VmSpec, decode, encode, order_envelope, signed_bytes

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
               ttl_s: float = 600, issued_at: float | None = None) -> Order:
        self.seq += 1
        now = time.time() if issued_at is None else issued_at
        order = Order(node=NODE, seq=self.seq, order_id=f"ord-{self.seq}", issued_at=now,
                      expires_at=now + ttl_s, action=action, params=params, vm=vm)
        return dataclasses.replace(
            order, signature=self.key.sign(signed_bytes(order_envelope(order))).signature)

    def submit(self, order: Order) -> str:
        """Hand over a signed order without waiting; its id."""
        self.ended.setdefault(order.order_id, asyncio.Event())
        self.runner.submit(order, encode(order))
        return order.order_id

    async def final(self, order_id: str, timeout_s: float = 10) -> Report:
        """The order's final report (succeeded or failed), once it comes."""
        ended = self.ended.setdefault(order_id, asyncio.Event())
        await asyncio.wait_for(ended.wait(), timeout_s)
        return next(r for r in reversed(self.reports) if r.order_id == order_id)

    async def order(self, action: str, params: dict[str, Any],
                    vm: VmSpec | None = None, issued_at: float | None = None) -> Report:
        """Sign and hand over one order; its final report."""
        return await self.final(self.submit(self.signed(action, params, vm,
                                                        issued_at=issued_at)))

    def states(self, order_id: str) -> list[str]:
        """The states the node reported for the order, in turn."""
        return [r.state for r in self.reports if r.order_id == order_id]


@contextlib.asynccontextmanager
async def running_node(tmp_path: Path, lease_s: float = 0.0,
                       contact_at_start: float | None = None,
                       before: Callable[[Node], Awaitable[None]] | None = None,
                       hypervisor: type[Hypervisor] = Hypervisor,
                       ) -> AsyncIterator[Node]:
    """A runner on the test driver; ``before`` sets the scene before it starts (it recovers
    first thing, as at an agent's start). ``hypervisor``: the class to connect with."""
    hv = await hypervisor.open("test:///default")
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
        settings=Settings(
            node=NODE, limits=NodeLimits("SI", "arnes", Reservations()),
            storage=Storage(tmp_path / "images", tmp_path / "disks", "https://127.0.0.1:9/", 5.0),
            migration=Migration("127.0.0.2"), lease_s=lease_s),
        key=key.verify_key, journal=journal, hypervisor=lambda: hv, tls=lambda: None,
        report=report)
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


def vm_spec(name: str) -> VmSpec:
    return VmSpec(uuid=str(uuid.uuid4()), name=name, vcpus=1, memory_mib=64)
