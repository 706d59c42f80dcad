"""Beginning a move: the checks here (the VM, its node, its open orders, the mode), the
destination (:mod:`aggregator.workloads.destinations`), then the destination's ``receive``
order. The rest of the way is :mod:`aggregator.workloads.moves_advance`'s."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

from aggregator.errors import Refused
from aggregator.store import moves as repo
from aggregator.store import orders as order_repo
from aggregator.store.tx import Tx
from aggregator.trust.audit import record as audit
from aggregator.workloads import destinations, orders, vms
from aggregator.workloads.moves_settings import Context, MoveSettings
from contract.orders import ReceiveParams

_RUNNING = ("running", "paused")


def _movable(conn: Tx, ctx: Context, vm_id: str, now: float
             ) -> tuple[repo.VmToMove, repo.NodeFacts]:
    """The VM and its node, if the VM may be moved now; Refused otherwise."""
    vm = repo.movable_vm(conn, vm_id)
    if vm is None:
        raise Refused("not_found", f"no VM {vm_id!r}", 404)
    if vm.node_id is None:
        raise Refused("not_placed", "the VM is on no node (its creation failed)", 409)
    if vm.desired_state == "deleted":
        raise Refused("deleting", "the VM is being deleted", 409)
    busy = repo.open_move(conn, vm_id)
    if busy is not None:
        raise Refused("moving", f"the VM is being moved already ({busy})", 409)
    if order_repo.has_open_order(conn, vm_id, orders.VM_ACTIONS):
        raise Refused("busy", "an order for the VM is still open: try again when it ends", 409)
    source = repo.node_facts(conn, vm.node_id)
    assert source is not None
    if not destinations.is_online(source, now, ctx.live):
        raise Refused("source_offline", f"the VM's node {vm.node_id} is not online: it cannot"
                      " hand the VM over", 409)
    return vm, source


def _mode(settings: MoveSettings, vm: repo.VmToMove, source: repo.NodeFacts) -> str:
    """The move's mode: ``auto`` is live where the VM runs and its node can; a live move
    needs both (Refused otherwise)."""
    mode = settings.mode
    if mode == "auto":
        mode = ("live" if vm.actual_state in _RUNNING and destinations.live_capable(source)
                else "cold")
    if mode == "live":
        if vm.actual_state not in _RUNNING:
            raise Refused("not_running", f"the VM is {vm.actual_state}: a live migration needs"
                          " it running (a cold move does not)", 409)
        if not destinations.live_capable(source):
            raise Refused("no_live_migration", f"{source.id} runs"
                          f" {destinations.domain_type(source) or 'no'} guests: no live"
                          " migration", 409)
    return mode


def start(conn: Tx, ctx: Context, vm_id: str, to: str,
          settings: MoveSettings, now: float, actor: str, drain_id: str | None = None
          ) -> dict[str, Any]:
    """Begin moving a VM: checks here, then the destination's ``receive`` order."""
    vm, source = _movable(conn, ctx, vm_id, now)
    mode = _mode(settings, vm, source)
    spec = vms.spec_of(conn, vm_id)
    try:
        dest_id = destinations.choose(conn, ctx, vm_id, source, to, mode == "live", now)
    except Refused:
        if settings.mode == "auto" and mode == "live" and not to:
            mode = "cold"  # no node for a live move: a cold one, where possible
            dest_id = destinations.choose(conn, ctx, vm_id, source, to, False, now)
        else:
            raise
    move_id = "mv-" + uuid.uuid4().hex[:16]
    repo.insert_move(conn, repo.NewMove(
        move_id, vm_id, source.id, mode, "preparing", now, dest=dest_id,
        settings=asdict(settings) | {"mode": mode}, drain_id=drain_id, actor=actor,
        vcpus=vm.vcpus, memory_mib=vm.memory_mib, disk_gib=vm.disk_gib))
    order_id = orders.issue(conn, ctx.signer, dest_id, vm_id,
                            ReceiveParams(mode=mode, source=source.id), now, ctx.ttl_s,
                            vm=spec, move_id=move_id)
    repo.set_step(conn, move_id, "preparing", order_id, now)
    order_repo.set_vm_reason(conn, vm_id, f"moving to {dest_id} ({mode})", now)
    audit(conn, now, actor, "vm.migrate", vm_id, name=vm.name, source=source.id, dest=dest_id,
          mode=mode, move=move_id)
    return {"id": vm_id, "move": move_id, "source": source.id, "dest": dest_id, "mode": mode,
            "order": order_id}
