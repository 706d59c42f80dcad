"""Both sides of a move through the runner on libvirt's test driver: the destination
receives and adopts, the source refuses what the VM's policy or the order's life forbids and
moves a guest cold."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contract.wire import VmSpec
from tests.agent.orders.noderig import Node, running_node, vm_spec


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with running_node(tmp_path) as started:
        yield started


def _move(vm: VmSpec, **changes: Any) -> dict[str, Any]:
    return {"vm_uuid": vm.uuid, "dest": "si-b", "mode": "cold", "dest_country": "SI",
            "dest_provider": "arnes", "address": "127.0.0.3", "domain_type": "test",
            "max_downtime_ms": 300, "auto_converge": True, "postcopy": False,
            "timeout_s": 300.0, **changes}


async def _made(node: Node, vm: VmSpec) -> None:
    made = await node.order("create", {}, vm=vm)
    assert made.state == "succeeded", made.error


async def test_a_cold_move_without_a_disk_leaves_nothing_here(node: Node) -> None:
    vm = vm_spec("cold")
    await _made(node, vm)
    moved = await node.order("migrate", _move(vm))
    assert moved.state == "succeeded", moved.error
    assert {k: moved.result[k] for k in ("mode", "dest", "transferred_bytes")} == {
        "mode": "cold", "dest": "si-b", "transferred_bytes": 0}
    assert await node.hv.state(vm.uuid) is None
    assert await node.journal.desired_of(vm.uuid) is None


@pytest.mark.parametrize(("changes", "ttl_s", "error"), [
    ({"dest_country": "AT"}, 600,
     "refused: the destination si-b has country AT; the VM allows only SI"),
    ({"dest_provider": ""}, 600,
     "refused: the destination si-b has provider unknown; the VM allows only arnes"),
    ({"dest": "si-a"}, 600, "refused: the destination is this node"),
    ({}, 35, r"refused: only [45] s of the order's life is left: too little to migrate"),
    ({"mode": "live", "domain_type": "kvm"}, 600,
     "refused: the destination runs kvm guests, this VM is a test guest"),
])
async def test_the_source_refuses_and_keeps_the_vm(node: Node, changes: dict[str, Any],
                                                   ttl_s: float, error: str) -> None:
    vm = dataclasses.replace(vm_spec("kept"), countries=("SI",), providers=("arnes",))
    await _made(node, vm)
    order = node.signed("migrate", _move(vm, **changes), ttl_s=ttl_s)
    refused = await node.final(node.submit(order))
    assert refused.state == "failed"
    assert re.fullmatch(error, refused.error), refused.error
    assert await node.hv.state(vm.uuid) == "running"
    want = await node.journal.desired_of(vm.uuid)
    assert want is not None
    assert want.state == "running"  # no more "leaving"


async def test_the_destination_receives_then_adopts_and_boots_a_cold_move(node: Node) -> None:
    vm = vm_spec("arriving")
    received = await node.order("receive", {"mode": "cold", "source": "si-b"}, vm=vm)
    assert received.state == "succeeded", received.error
    assert (received.result["address"], received.result["domain_type"]) == (
        "127.0.0.2", "test")
    want = await node.journal.desired_of(vm.uuid)
    assert want is not None
    assert want.state == "incoming"
    again = await node.order("receive", {"mode": "cold", "source": "si-b"}, vm=vm)
    assert again.state == "succeeded"  # prepared before: prepared again

    early = await node.order("adopt", {"vm_uuid": vm.uuid, "mode": "live", "start": True})
    assert early.error == "refused: the VM has not arrived on this node"
    adopted = await node.order("adopt", {"vm_uuid": vm.uuid, "mode": "cold", "start": True})
    assert (adopted.state, adopted.result) == ("succeeded", {"state": "running"})
    want = await node.journal.desired_of(vm.uuid)
    assert want is not None
    assert want.state == "running"
    twice = await node.order("receive", {"mode": "cold", "source": "si-b"}, vm=vm)
    assert twice.error == "refused: the VM is on this node already"


async def test_a_node_refuses_to_adopt_what_it_did_not_prepare(node: Node) -> None:
    vm = vm_spec("stranger")
    asked = await node.order("adopt", {"vm_uuid": vm.uuid, "mode": "cold", "start": False})
    assert asked.error == "refused: this node did not prepare to receive the VM"
